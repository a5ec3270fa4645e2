"""Audit events off the association path: a bounded queue, one database writer, a durable spool.

The receiver's handlers run on pynetdicom's association threads (and the acceptor thread for
refused connections), where waiting for a database lock delays every C-ECHO and C-STORE. They
hand their events to ``AuditLog.record``, which never waits for the database: one writer thread
drains the queue into the ``events`` table. When the database cannot take them (locked, down,
slower than ``lock_wait_s``) or the queue is full, events go to an append-only JSON-lines spool
under the storage root, fsynced, and the writer replays it once the database is writable again.

Replay is idempotent: each event carries its own timestamp, unique per process to the
microsecond, and an event already in the table (written, then the process stopped before the
spool was cut) is not inserted twice. Processes sharing a storage root (a receiver and
receive-less workers) share the spool: appends and cuts hold a file lock, and one process at a
time replays.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from triage_agent import db, metrics
from triage_agent.models import Event, utcnow
from triage_agent.storage import fsync_dir

log = logging.getLogger(__name__)

SPOOL_NAME = "audit-spool.jsonl"
# Event columns an audit record may set, with their lengths (longer values are cut, so that a
# strict database never refuses an event and leaves it stuck in the spool).
FIELDS: dict[str, int | None] = {
    "kind": 32, "calling_ae": 16, "source_address": 64, "study_instance_uid": 64,
    "series_instance_uid": 64, "sop_instance_uid": 64, "status": None, "detail": None,
    "flagged": None,
}
BATCH = 500


@dataclass
class _Pending:
    fields: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)


_STOP = _Pending({})


class AuditLog:
    """``record`` from any thread; ``start``/``stop`` with the node."""

    def __init__(self, sessions: sessionmaker[Session], spool_path: Path, *,
                 max_queued: int = 10_000, lock_wait_s: float = 2.0, confirm_s: float = 0.2,
                 retry_s: float = 1.0) -> None:
        self.sessions = sessions
        self.spool_path = Path(spool_path)
        self.lock_wait_s = lock_wait_s  # longest the writer waits for a lock before spooling
        self.confirm_s = confirm_s  # longest record() waits to see its event written
        self.retry_s = retry_s  # how often a non-empty spool is tried again
        self._queue: queue.Queue[_Pending] = queue.Queue(max_queued)
        self._spool_lock = threading.Lock()
        self._stamp_lock = threading.Lock()
        self._last_at = dt.datetime.min
        self._spooled = 0
        self._busy_since: float | None = None
        self._state = "new"  # new -> running -> stopped
        self._state_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- producers ---------------------------------------------------------------------------

    def record(self, kind: str, **fields: Any) -> None:
        """Hand one event to the writer; never raises, never waits for a database lock.

        While the writer keeps up, waits up to ``confirm_s`` for the row, so the event is
        durable when the caller carries on; otherwise returns at once (queued or spooled).
        """
        try:
            item = _Pending(self._fields(kind, fields))
            if self._state == "new":
                self.start()
            if self._state != "running":
                self._spool([item])
                return
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self._spool([item])
                return
            if self._keeping_up():
                item.done.wait(self.confirm_s)
        except Exception:  # the audit trail must not take the receiver down with it
            log.exception("could not record audit event %s", kind)

    def _fields(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise TypeError(f"not an audit event field: {', '.join(sorted(unknown))}")
        out: dict[str, Any] = {}
        for name, value in {"kind": kind, **fields}.items():
            limit = FIELDS[name]
            out[name] = value[:limit] if limit and isinstance(value, str) else value
        with self._stamp_lock:  # unique per process: replay tells events apart by it
            at = max(utcnow(), self._last_at + dt.timedelta(microseconds=1))
            self._last_at = at
        out["at"] = at
        return out

    def _keeping_up(self) -> bool:
        busy = self._busy_since
        return self._spooled == 0 and (busy is None or time.monotonic() - busy < self.confirm_s)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        with self._state_lock:
            if self._state != "new":
                return
            self._recover_spool()
            self._state = "running"
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()
        metrics.AUDIT_QUEUE_DEPTH.set_function(self._queue.qsize)

    def stop(self, timeout_s: float | None = None) -> None:
        """Write what is queued (or spool it), then stop the writer. Events recorded later go
        straight to the spool, for the next start to replay."""
        with self._state_lock:
            if self._state != "running":
                self._state = "stopped"
                return
            self._state = "stopped"
        self._queue.put(_STOP)
        assert self._thread is not None
        self._thread.join(self.lock_wait_s + 5.0 if timeout_s is None else timeout_s)
        left = self._drain()  # the writer did not finish in time: keep the rest on disk
        if left:
            self._spool(left)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until nothing is queued or spooled (tests, shutdown reports)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0 and self._spooled == 0:
                return True
            time.sleep(0.02)
        return False

    @property
    def spooled(self) -> int:
        """Events waiting in the spool for the database."""
        return self._spooled

    # -- the writer --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                batch = [self._queue.get(timeout=self.retry_s)]
            except queue.Empty:
                batch = []
            batch += self._drain(BATCH)
            stopping = any(item is _STOP for item in batch)
            events = [item for item in batch if item is not _STOP]
            try:
                if self._spooled and not self._replay():
                    self._spool(events)  # the database is still not writable: keep the order
                elif events and not self._write(events):
                    self._spool(events)
            except Exception:
                log.exception("audit writer failed; events kept in the spool")
                self._spool(events)
            finally:
                for item in batch:
                    item.done.set()
                    self._queue.task_done()
            if stopping:
                return

    def _drain(self, limit: int | None = None) -> list[_Pending]:
        out: list[_Pending] = []
        while limit is None or len(out) < limit:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return out

    def _write(self, events: list[_Pending]) -> bool:
        """Insert in one transaction; False (caller spools) if the database cannot take them."""
        self._busy_since = time.monotonic()
        try:
            with db.lock_wait_deadline(self.lock_wait_s), self.sessions() as s, s.begin():
                s.add_all([Event(**e.fields) for e in events])
        except (DataError, IntegrityError):
            self._write_one_by_one(events)
        except Exception as e:
            log.warning("database not writable for audit events (%s); %d kept in %s",
                        e.__class__.__name__, len(events), self.spool_path.name)
            return False
        finally:
            self._busy_since = None
        metrics.AUDIT_EVENTS.labels("written").inc(len(events))
        return True

    def _write_one_by_one(self, events: list[_Pending]) -> None:
        """A value the database refuses must not hold back the others, nor stay spooled."""
        for e in events:
            try:
                with db.lock_wait_deadline(self.lock_wait_s), self.sessions() as s, s.begin():
                    s.add(Event(**e.fields))
            except (DataError, IntegrityError) as err:
                metrics.AUDIT_EVENTS.labels("dropped").inc()
                log.error("audit event %s refused by the database (%s); dropped",
                          e.fields.get("kind"), err.__class__.__name__)

    # -- the spool ---------------------------------------------------------------------------

    def _spool(self, events: list[_Pending]) -> None:
        if not events:
            return
        lines = b"".join(_encode(e.fields) for e in events)
        try:
            with self._locked():
                new = not self.spool_path.exists()
                with open(self.spool_path, "ab") as f:
                    f.write(lines)
                    f.flush()
                    os.fsync(f.fileno())
                if new:
                    fsync_dir(self.spool_path.parent)
                self._spooled += len(events)
        except OSError as e:
            metrics.AUDIT_EVENTS.labels("lost").inc(len(events))
            log.error("%d audit event(s) lost: cannot write %s (%s)", len(events),
                      self.spool_path.name, e.strerror or e)
            return
        metrics.AUDIT_EVENTS.labels("spooled").inc(len(events))
        metrics.AUDIT_SPOOLED.set(self._spooled)

    @contextlib.contextmanager
    def _locked(self, suffix: str = ".lock", wait: bool = True) -> Iterator[bool]:
        """This process's threads and other processes on the same spool, one at a time. With
        ``wait=False`` yields False at once when another holds it."""
        threads = self._spool_lock if suffix == ".lock" else contextlib.nullcontext()
        lock_path = self.spool_path.with_name(self.spool_path.name + suffix)
        with threads, open(lock_path, "ab") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True  # closing the file releases the lock

    def _recover_spool(self) -> None:
        """Count what an earlier run left; end a line a crash cut short so appends stay whole."""
        with self._locked():
            try:
                data = self.spool_path.read_bytes()
            except FileNotFoundError:
                data = b""
            if data and not data.endswith(b"\n"):
                with open(self.spool_path, "ab") as f:
                    f.write(b"\n")
                    f.flush()
                    os.fsync(f.fileno())
                data += b"\n"
        self._spooled = data.count(b"\n")
        metrics.AUDIT_SPOOLED.set(self._spooled)
        if self._spooled:
            log.info("%d audit event(s) in %s wait for the database", self._spooled,
                     self.spool_path.name)

    def _replay(self) -> bool:
        """Move the spool into the database, BATCH events per transaction; False if the
        database is still not writable (the rest stays spooled) or another process is
        replaying it."""
        with self._locked(".replay.lock", wait=False) as mine:
            return mine and self._replay_locked()

    def _replay_locked(self) -> bool:
        while True:
            with self._locked():
                try:
                    data = self.spool_path.read_bytes()
                except FileNotFoundError:
                    data = b""
            lines = data.splitlines(keepends=True)[:BATCH]
            if not lines:
                self._spooled = 0
                metrics.AUDIT_SPOOLED.set(0)
                return True
            events = []
            for line in lines:
                try:
                    events.append(_decode(line))
                except (ValueError, TypeError, KeyError):
                    metrics.AUDIT_EVENTS.labels("lost").inc()
                    log.error("unreadable line in %s skipped", self.spool_path.name)
            self._busy_since = time.monotonic()
            try:
                with db.lock_wait_deadline(self.lock_wait_s), self.sessions() as s, s.begin():
                    new = [e for e in events if not _present(s, e)]
                    s.add_all([Event(**e) for e in new])
            except Exception as e:
                log.warning("audit spool not replayed yet (%s); %d event(s) wait",
                            e.__class__.__name__, self._spooled)
                return False
            finally:
                self._busy_since = None
            self._cut(sum(len(line) for line in lines))
            metrics.AUDIT_EVENTS.labels("replayed").inc(len(new))
            log.info("%d audit event(s) replayed from %s", len(new), self.spool_path.name)

    def _cut(self, n_bytes: int) -> None:
        """Drop the first ``n_bytes`` (replayed) of the spool; appends since then are kept."""
        with self._locked():
            rest = self.spool_path.read_bytes()[n_bytes:]
            if rest:
                tmp = self.spool_path.with_name(self.spool_path.name + ".tmp")
                with open(tmp, "wb") as f:
                    f.write(rest)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.spool_path)
            else:
                self.spool_path.unlink()
            fsync_dir(self.spool_path.parent)
            self._spooled = rest.count(b"\n")
        metrics.AUDIT_SPOOLED.set(self._spooled)


def _encode(fields: dict[str, Any]) -> bytes:
    return (json.dumps({**fields, "at": fields["at"].isoformat()}, ensure_ascii=True,
                       separators=(",", ":")) + "\n").encode()


def _decode(line: bytes) -> dict[str, Any]:
    raw = json.loads(line)
    if not isinstance(raw, dict) or not raw.get("kind"):
        raise ValueError("not an audit event")
    out = {k: raw[k] for k in FIELDS if k in raw}
    out["at"] = dt.datetime.fromisoformat(raw["at"])
    return out


def _present(s: Session, fields: dict[str, Any]) -> bool:
    """The same event (same timestamp and fields) is already a row."""
    rows = s.scalars(select(Event).where(Event.at == fields["at"], Event.kind == fields["kind"]))
    return any(all(getattr(r, k) == fields.get(k, _default(k)) for k in FIELDS) for r in rows)


def _default(name: str) -> Any:
    return False if name == "flagged" else None
