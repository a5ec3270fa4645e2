"""The audit writer (triage_agent/audit.py): events never wait for a locked database, none is lost
while it is locked, none is written twice when the spool is replayed."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from triage_agent import db
from triage_agent.audit import SPOOL_NAME, AuditLog, _encode
from triage_agent.models import Event, utcnow


@pytest.fixture
def database(tmp_path: Path) -> Iterator[tuple[Path, Any]]:
    path = tmp_path / "triage.db"
    url = f"sqlite:///{path}"
    db.upgrade(url)
    engine = db.make_engine(url)
    db.check_connection(engine)  # as the node does at start: the database is now in WAL mode
    yield path, db.session_factory(engine)
    engine.dispose()


class Lock:
    """An outside writer holding the SQLite database (an admin's `BEGIN EXCLUSIVE`)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, timeout=10, isolation_level=None,
                                    check_same_thread=False)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


def kinds(sessions: Any) -> list[str]:
    with sessions() as s:
        return [e.kind for e in s.scalars(select(Event).order_by(Event.at))]


def test_event_becomes_a_row(database: Any, tmp_path: Path) -> None:
    _, sessions = database
    log = AuditLog(sessions, tmp_path / SPOOL_NAME)
    try:
        log.record("association_accepted", calling_ae="MODALITY", source_address="10.0.0.7")
        assert log.flush(10)
        assert kinds(sessions) == ["association_accepted"]
        with sessions() as s:
            ev = s.scalars(select(Event)).one()
        assert (ev.calling_ae, ev.source_address, ev.flagged) == ("MODALITY", "10.0.0.7", False)
    finally:
        log.stop()
    assert not (tmp_path / SPOOL_NAME).exists()


def test_locked_database_never_delays_record_and_loses_nothing(database: Any,
                                                               tmp_path: Path) -> None:
    path, sessions = database
    spool = tmp_path / SPOOL_NAME
    log = AuditLog(sessions, spool, lock_wait_s=0.3, retry_s=0.1, max_queued=5)
    log.start()
    lock = Lock(path)
    try:
        slowest = 0.0
        for i in range(40):  # more than the queue holds: the overflow goes straight to the spool
            t0 = time.perf_counter()
            log.record("association_accepted", source_address=f"10.0.0.{i}")
            slowest = max(slowest, time.perf_counter() - t0)
        assert slowest < 0.5  # never the lock wait, at most the short confirmation wait
        deadline = time.monotonic() + 10
        while log.spooled < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.spooled == 40  # all on disk while the database is locked
        assert len(spool.read_text().splitlines()) == 40
        assert REGISTRY.get_sample_value("triage_audit_spooled_events") == 40
    finally:
        lock.release()
    assert log.flush(15)
    log.stop()
    with sessions() as s:
        addresses = sorted(s.scalars(select(Event.source_address)))
    assert addresses == sorted(f"10.0.0.{i}" for i in range(40))  # each once
    assert not spool.exists()
    assert REGISTRY.get_sample_value("triage_audit_spooled_events") == 0


def test_two_processes_sharing_the_spool_lose_and_double_nothing(database: Any,
                                                                 tmp_path: Path) -> None:
    """A receiver and a receive-less worker on one storage root append to and replay the
    same spool (each AuditLog stands for a process: its own locks, its own file handles)."""
    path, sessions = database
    spool = tmp_path / SPOOL_NAME
    logs = [AuditLog(sessions, spool, lock_wait_s=0.2, retry_s=0.05, max_queued=3)
            for _ in range(2)]
    for log in logs:
        log.start()
    lock = Lock(path)
    try:
        threads = [threading.Thread(target=lambda n=n, log=log: [
            log.record("association_accepted", detail=f"{n}-{i}") for i in range(25)])
            for n, log in enumerate(logs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.5)
    finally:
        lock.release()
    for log in logs:
        assert log.flush(20)
        log.stop()
    with sessions() as s:
        details = sorted(s.scalars(select(Event.detail)))
    assert details == sorted(f"{n}-{i}" for n in range(2) for i in range(25))
    assert not spool.exists()


def test_replay_after_a_crash_between_insert_and_spool_cut_writes_each_once(
        database: Any, tmp_path: Path) -> None:
    _, sessions = database
    spool = tmp_path / SPOOL_NAME
    events = [{"kind": "contexts_refused", "source_address": "10.1.1.1", "detail": f"n{i}",
               "flagged": True, "at": utcnow().replace(microsecond=i)} for i in range(6)]
    spool.write_bytes(b"".join(_encode(e) for e in events))
    with sessions() as s, s.begin():  # the first three were written before the crash
        s.add_all([Event(**e) for e in events[:3]])
    log = AuditLog(sessions, spool, retry_s=0.05)
    log.start()
    try:
        assert log.flush(10)
    finally:
        log.stop()
    with sessions() as s:
        details = sorted(s.scalars(select(Event.detail)))
    assert details == [f"n{i}" for i in range(6)]
    assert not spool.exists()


def test_torn_spool_line_is_skipped_and_the_rest_replayed(database: Any, tmp_path: Path) -> None:
    _, sessions = database
    spool = tmp_path / SPOOL_NAME
    whole = _encode({"kind": "tls_refused", "source_address": "10.2.2.2", "at": utcnow()})
    spool.write_bytes(whole + whole[:20])  # the power went out mid-line
    log = AuditLog(sessions, spool, retry_s=0.05)
    log.start()
    try:
        log.record("association_accepted")
        assert log.flush(10)
    finally:
        log.stop()
    assert sorted(kinds(sessions)) == ["association_accepted", "tls_refused"]


def test_events_after_stop_wait_in_the_spool_for_the_next_start(database: Any,
                                                                tmp_path: Path) -> None:
    _, sessions = database
    spool = tmp_path / SPOOL_NAME
    first = AuditLog(sessions, spool)
    first.start()
    first.stop()
    first.record("association_aborted", detail="late")
    assert kinds(sessions) == [] and first.spooled == 1
    second = AuditLog(sessions, spool, retry_s=0.05)
    second.start()
    try:
        assert second.flush(10)
    finally:
        second.stop()
    assert kinds(sessions) == ["association_aborted"]


def test_lock_wait_deadline_bounds_a_transaction_on_a_locked_database(database: Any) -> None:
    path, sessions = database
    lock = Lock(path)
    errors: list[BaseException] = []
    t0 = time.perf_counter()

    def write() -> None:
        try:
            with db.lock_wait_deadline(0.5), sessions() as s, s.begin():
                s.add(Event(kind="x"))
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=write)
    t.start()
    t.join(10)
    waited = time.perf_counter() - t0
    lock.release()
    assert len(errors) == 1 and db.is_lock_timeout(errors[0])
    assert waited < 3.0  # not the 30 s default busy timeout
    with sessions() as s, s.begin():  # without a deadline the same pool works as before
        s.add(Event(kind="y"))
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Event)) == 1


@pytest.mark.postgres
def test_postgres_lock_wait_deadline_and_audit_spool(pg_server: Any, tmp_path: Path) -> None:
    """The same bounds on PostgreSQL: lock_timeout ends the wait, the audit events wait in the
    spool while the events table is locked and are written once when it is free."""
    import sqlalchemy as sa

    url = pg_server.new_database()
    db.upgrade(url)
    engine = db.make_engine(url)
    sessions = db.session_factory(engine)
    holder = sa.create_engine(url).connect()
    try:
        holder.execute(sa.text("LOCK TABLE events IN ACCESS EXCLUSIVE MODE"))
        t0 = time.perf_counter()
        with (pytest.raises(sa.exc.OperationalError) as err, db.lock_wait_deadline(0.5),
              sessions() as s, s.begin()):
            s.add(Event(kind="x"))
        assert db.is_lock_timeout(err.value) and time.perf_counter() - t0 < 3.0
        log = AuditLog(sessions, tmp_path / SPOOL_NAME, lock_wait_s=0.3, retry_s=0.1)
        log.start()
        for i in range(5):
            log.record("association_accepted", source_address=f"10.3.0.{i}")
        deadline = time.monotonic() + 10
        while log.spooled < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.spooled == 5
    finally:
        holder.rollback()
        holder.close()
    assert log.flush(15)
    log.stop()
    with sessions() as s:
        assert sorted(s.scalars(select(Event.source_address))) == [f"10.3.0.{i}" for i in range(5)]
    engine.dispose()
