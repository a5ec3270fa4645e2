"""Delivery of result objects: C-STORE SCU with every status checked, retries, dead letters.

One row per object and destination (``deliveries``) is the unit of retry. Each destination has
its own delivery lane (``DeliveryLanes``): threads of its own (``concurrency`` per destination),
its own backoff and its own circuit breaker (triage_agent/delivery.py), so a hung, slow or
refusing destination never delays another. A claim takes a lease so that two processes never
send the same row at once, and a crash mid-send only means the row is sent again (the object's
UID is fixed, so the PACS sees the same instance, not a new one).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import random
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from triage_agent import metrics, pynetdicom_compat
from triage_agent.config import (
    AgentConfig,
    DestinationConfig,
    DicomWebDestinationConfig,
    HL7DestinationConfig,
)
from triage_agent.delivery import (
    DELIVERED,
    PERMANENT,
    TRANSIENT,
    CircuitBreaker,
    CircuitSnapshot,
    Outcome,
    Permit,
    SendOutcome,
    Transition,
    went_unanswered,
)
from triage_agent.dicomweb import send_stow, stow_destination_key
from triage_agent.models import (
    Delivery,
    DeliveryState,
    Event,
    Job,
    Output,
    Result,
    Series,
    SeriesState,
    utcnow,
)
from triage_agent.storage import Storage

log = logging.getLogger(__name__)

HL7_PREFIX = "hl7:"


def destination_key(dest: DestinationConfig) -> str:
    return dest.name or f"{dest.ae_title}@{dest.host}:{dest.port}"


def hl7_destination_key(dest: HL7DestinationConfig) -> str:
    return HL7_PREFIX + dest.name


def _send_hl7(dest: HL7DestinationConfig, files: list[Path]) -> list[SendOutcome]:
    # Lazy: hl7 builds its messages with outputs.sr, which imports highdicom (seconds); only
    # HL7 deliveries need it.
    from triage_agent.hl7 import HL7Destination, send_mllp

    target = HL7Destination(**dest.model_dump())
    return [send_mllp(target, f.read_bytes()) for f in files]


def classify_status(status: int) -> Outcome:
    """Map a C-STORE response status to delivered / transient / permanent."""
    if status == 0x0000 or 0xB000 <= status <= 0xBFFF:  # success, or success with warnings
        return DELIVERED
    if 0xA700 <= status <= 0xA7FF:  # out of resources: the PACS may recover
        return TRANSIENT
    return PERMANENT  # 0xA9xx mismatch, 0xCxxx cannot understand, 0x0122 / 0x0124 refused


class _SSLErrorTrap(logging.Handler):
    """pynetdicom logs TLS failures (handshake, peer alerts) and swallows them; keep the first."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.error: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if self.error is None and isinstance(exc, ssl.SSLError):
            self.error = str(exc)


def build_scu_ssl(dest: DestinationConfig) -> ssl.SSLContext | None:
    if dest.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(dest.tls.ca_certificate))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if dest.tls.certificate and dest.tls.private_key:
        ctx.load_cert_chain(str(dest.tls.certificate), str(dest.tls.private_key))
    return ctx


def send_files(
    dest: DestinationConfig, files: list[Path], *, calling_ae: str, timeout_s: float
) -> list[SendOutcome]:
    """Send files on one association; one outcome per file, in order."""
    datasets = [dcmread(f) for f in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ctx = build_scu_ssl(dest)
    tls_args = (ctx, dest.host) if ctx is not None else None
    trap = _SSLErrorTrap()
    pyn_log = logging.getLogger("pynetdicom")
    pyn_log.addHandler(trap)
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    except (OSError, ssl.SSLError) as e:
        return [SendOutcome(TRANSIENT, None, f"cannot connect: {e}")] * len(files)
    finally:
        pyn_log.removeHandler(trap)
    if assoc.is_rejected:
        rej = assoc.acceptor.primitive
        result = getattr(rej, "result", None)
        why = f"association rejected (result {result}, reason {getattr(rej, 'diagnostic', '?')})"
        kind = PERMANENT if result == 1 else TRANSIENT
        return [SendOutcome(kind, None, why, answered=True)] * len(files)
    if not assoc.is_established:
        why = (f"TLS handshake failed: {trap.error}" if trap.error else
               "association aborted or refused" + (" (TLS: check certificates and the peer's log)"
                                                   if dest.tls else ""))
        return [SendOutcome(TRANSIENT, None, why)] * len(files)
    pynetdicom_compat.prepare_requestor(assoc)
    outcomes: list[SendOutcome] = []
    try:
        accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
        for ds in datasets:
            if str(ds.SOPClassUID) not in accepted:
                outcomes.append(SendOutcome(PERMANENT, None,
                                            f"destination does not accept SOP class {ds.SOPClassUID}",
                                            answered=True))
                continue
            if not assoc.is_established:
                outcomes.append(SendOutcome(TRANSIENT, None, "association lost"))
                continue
            try:
                rsp = assoc.send_c_store(ds)
            except Exception as e:  # e.g. a dataset the peer's context cannot carry
                outcomes.append(SendOutcome(TRANSIENT, None, f"send failed: {e.__class__.__name__}"))
                continue
            status = getattr(rsp, "Status", None)
            if status is None:  # timeout, abort or invalid response: unknown, so retry
                outcomes.append(SendOutcome(TRANSIENT, None, "no response (timeout or abort)"))
                if assoc.is_established:  # the rest would each wait a full timeout too
                    assoc.abort()
                continue
            kind = classify_status(int(status))
            comment = getattr(rsp, "ErrorComment", None)
            outcomes.append(SendOutcome(kind, int(status),
                                        None if kind == DELIVERED else
                                        f"status 0x{int(status):04X}" + (f": {comment}" if comment else "")))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


Destination = DestinationConfig | HL7DestinationConfig | DicomWebDestinationConfig


class Sender:
    """Claims due deliveries, sends them and records the outcomes in the ledger."""

    def __init__(self, cfg: AgentConfig, sessions: sessionmaker[Session], storage: Storage) -> None:
        self.cfg = cfg
        self.sessions = sessions
        self.storage = storage

    def backoff_s(self, attempts: int) -> float:
        d = self.cfg.delivery
        delay = min(d.backoff_cap_s, d.backoff_base_s * 2 ** max(0, attempts - 1))
        return delay * random.uniform(0.5, 1.0)

    def destinations(self) -> dict[str, Destination]:
        """Every configured destination by the key its delivery rows carry."""
        dests: dict[str, Destination] = {destination_key(d): d for d in self.cfg.destinations}
        dests.update({hl7_destination_key(d): d for d in self.cfg.hl7_destinations})
        dests.update({stow_destination_key(d): d for d in self.cfg.dicomweb_destinations})
        return dests

    def run_once(self, limit: int = 50, destination: str | None = None) -> int:
        """Claim due deliveries (of every destination, or of one), send them grouped by
        destination; returns how many were tried."""
        where = None if destination is None else Delivery.destination == destination
        batch = self._claim(limit, where)
        for key, items in batch.items():
            self._send_and_record(key, items)
        return sum(len(v) for v in batch.values())

    def deliver(self, destination: str, limit: int = 50) -> tuple[int, bool | None, str | None]:
        """One lane's step: claim up to ``limit`` due deliveries of ``destination`` and send them
        on one association. Returns (rows tried, whether the destination answered none of them
        (None: nothing was sent), the first error)."""
        items = self._claim(limit, Delivery.destination == destination).get(destination, [])
        if not items:
            return 0, None, None
        sent = self._send_and_record(destination, items)
        return len(items), went_unanswered(sent), next((o.error for o in sent if o.error), None)

    def dead_letter_unconfigured(self, limit: int = 50) -> int:
        """Dead-letter due deliveries to destinations no longer configured (no lane takes them)."""
        keys = list(self.destinations())
        where = Delivery.destination.not_in(keys) if keys else None
        batch = self._claim(limit, where)
        for key, items in batch.items():
            self._send_and_record(key, items)
        return sum(len(v) for v in batch.values())

    def _claim(self, limit: int,
               where: ColumnElement[bool] | None) -> dict[str, list[tuple[int, Path]]]:
        """Take due rows (pending and due, or sending with an expired lease): each gets a lease
        and spends an attempt. On PostgreSQL locked rows are skipped, so several processes share
        the ledger."""
        now = utcnow()
        lease = dt.timedelta(seconds=self.lease_s())
        with self.sessions() as s, s.begin():
            stmt = (
                select(Delivery, Output.path)
                .join(Output, Output.id == Delivery.output_id)
                .where(or_(
                    and_(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now),
                    and_(Delivery.state == DeliveryState.SENDING, Delivery.lease_until < now),
                ))
                .order_by(Delivery.id)
                .limit(limit)
            )
            if where is not None:
                stmt = stmt.where(where)
            if s.get_bind().dialect.name == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True, of=Delivery)
            rows = s.execute(stmt).all()
            batch: dict[str, list[tuple[int, Path]]] = defaultdict(list)
            for d, path in rows:
                d.state = DeliveryState.SENDING
                d.lease_until = now + lease
                d.attempts += 1
                batch[d.destination].append((d.id, self.storage.abspath(path)))
        return batch

    def _send_and_record(self, key: str, items: list[tuple[int, Path]]) -> list[SendOutcome]:
        """Send claimed rows to one destination and record every outcome; returns the outcomes
        of what went over the network (not missing files or unknown destinations)."""
        deadline = time.monotonic() + self.lease_s() - 10  # claimed just before
        dest = self.destinations().get(key)
        sent: list[SendOutcome] = []
        if dest is None:
            outcomes = [SendOutcome(PERMANENT, None, "destination no longer configured")] * len(items)
        else:
            existing = [(i, p) for i, p in items if p.exists()]
            outcomes_by_id = {i: SendOutcome(PERMANENT, None, "output file missing")
                              for i, p in items if not p.exists()}
            if existing:
                sent = self.send(dest, [p for _, p in existing])
                outcomes_by_id.update({i: o for (i, _), o in zip(existing, sent, strict=True)})
            outcomes = [outcomes_by_id[i] for i, _ in items]
        self._record_until_written(key, [i for i, _ in items], outcomes, deadline)
        return sent

    def lease_s(self) -> float:
        """Seconds claimed rows stay this sender's; then another claim takes (and resends) them."""
        return self.cfg.delivery.timeout_s * 4 + 60

    def _record_until_written(self, key: str, ids: list[int], outcomes: list[SendOutcome],
                              deadline: float) -> None:
        """Record what was sent, retrying while the database cannot take it (a restart, a
        partition): an outcome not recorded is sent again once the lease expires, a duplicate at
        the destination. Gives up (raises) at ``deadline``, before the lease does."""
        delay = 0.5
        while True:
            try:
                self._record(key, ids, outcomes)
                return
            except SQLAlchemyError as e:
                if time.monotonic() + delay >= deadline:
                    raise
                log.warning("outcomes of %d delivery(ies) to %s not recorded yet (database: %s); "
                            "retrying in %.1f s", len(ids), key, e.__class__.__name__, delay)
                time.sleep(delay)
                delay = min(2 * delay, 5.0)

    def send(self, dest: Destination, paths: list[Path]) -> list[SendOutcome]:
        """The one place a destination's kind picks its protocol; one outcome per file."""
        if isinstance(dest, HL7DestinationConfig):
            return _send_hl7(dest, paths)
        if isinstance(dest, DicomWebDestinationConfig):
            return send_stow(dest, paths)
        return send_files(dest, paths, calling_ae=self.cfg.node.ae_title,
                          timeout_s=self.cfg.delivery.timeout_s)

    def _record(self, dest_key: str, ids: list[int], outcomes: list[SendOutcome]) -> None:
        max_attempts = self.cfg.delivery.max_attempts
        touched_results: set[int] = set()
        counted: list[str] = []  # counted once committed: a failed commit is recorded again
        with self.sessions() as s, s.begin():
            for did, out in zip(ids, outcomes, strict=True):
                d = s.get(Delivery, did)
                if d is None:
                    continue
                d.last_status = out.status
                d.lease_until = None
                counted.append("delivered" if out.kind == DELIVERED else "dead" if out.kind ==
                               PERMANENT or d.attempts >= max_attempts else "retry")
                if out.kind == DELIVERED:
                    d.state = DeliveryState.DELIVERED
                    d.delivered_at = utcnow()
                    d.last_error = None
                elif out.kind == PERMANENT or d.attempts >= max_attempts:
                    d.state = DeliveryState.DEAD
                    d.last_error = (out.error or "")[:2000] + (
                        f" (gave up after {d.attempts} attempts)" if out.kind == TRANSIENT else "")
                    log.warning("delivery %d to %s dead-lettered: %s", did, dest_key, d.last_error)
                    s.add(Event(kind="delivery_dead", detail=f"delivery {did} to {dest_key}: "
                                f"{d.last_error}"[:2000], status=out.status, flagged=True))
                else:
                    d.state = DeliveryState.PENDING
                    d.last_error = (out.error or "")[:2000]
                    d.next_attempt_at = utcnow() + dt.timedelta(seconds=self.backoff_s(d.attempts))
                    log.info("delivery %d to %s failed (attempt %d), retrying: %s", did, dest_key,
                             d.attempts, out.error)
                result_id = s.scalar(select(Output.result_id).where(Output.id == d.output_id))
                if result_id is not None:
                    touched_results.add(result_id)
            for rid in touched_results:
                update_series_delivery_state(s, rid)
        for outcome in counted:
            metrics.DELIVERIES.labels(outcome).inc()


class Lane:
    """One destination's delivery lane: ``concurrency`` threads sharing one circuit breaker.

    Each thread claims that destination's due rows and sends them on one association; with
    nothing due it sleeps ``[delivery] interval_s``. While the breaker is open nothing is
    claimed, so waiting rows spend no attempts and are never dead-lettered by it.
    """

    def __init__(self, key: str, sender: Sender, on_transition: Callable[..., None]) -> None:
        self.key = key
        self.sender = sender
        self.on_transition = on_transition
        d = sender.cfg.delivery
        self.breaker = CircuitBreaker(key, d.breaker_failures, d.breaker_cooldown_s,
                                      d.breaker_cooldown_cap_s)
        self.dest: Destination | None = None
        self.concurrency = 0
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        metrics.DESTINATION_CIRCUIT.labels(key).set(0)
        metrics.DESTINATION_FAILURES.labels(key).set(0)

    def apply(self, dest: Destination) -> None:
        """Take the destination's current settings; more threads when concurrency grew (extra
        ones end after their current send when it shrank); a changed address closes an open
        circuit so the new one is tried at once."""
        d = self.sender.cfg.delivery
        self.breaker.configure(d.breaker_failures, d.breaker_cooldown_s, d.breaker_cooldown_cap_s)
        if self.dest is not None and dest != self.dest:
            self._report(self.breaker.reset(), "settings changed, trying again")
        self.dest = dest
        self.concurrency = dest.concurrency if isinstance(dest, DestinationConfig) else 1
        self.threads = [t for t in self.threads if t.is_alive()]
        for i in range(len(self.threads), self.concurrency):
            t = threading.Thread(target=self._run, args=(i,), name=f"deliver-{self.key}-{i}",
                                 daemon=True)
            self.threads.append(t)
            t.start()

    def _run(self, index: int) -> None:
        while not self.stopping.is_set() and index < self.concurrency:
            try:
                wait = self._step()
            except Exception:  # a lane must outlive any one failure (database, peer, bug)
                log.exception("delivery to %s failed; will retry", self.key)
                self.breaker.record(None)
                wait = self.sender.cfg.delivery.interval_s
            if wait:
                self.stopping.wait(wait)

    def _step(self) -> float:
        """One claim-and-send if the breaker permits; returns how long to wait before the next
        (0: go on at once, more may be due)."""
        interval = self.sender.cfg.delivery.interval_s
        permit = self.breaker.permit()
        if permit is Permit.NONE:
            return min(interval, max(0.05, self.breaker.seconds_to_next_try()))
        tried, unanswered, error = self.sender.deliver(
            self.key, limit=1 if permit is Permit.PROBE else 50)
        transition = self.breaker.record(unanswered, error)
        if transition is Transition.CLOSED:
            error = "answered again" + (f" ({error})" if error else "")
        self._report(transition, error)
        return 0.0 if tried else interval

    def _report(self, transition: Transition | None, why: str | None) -> None:
        snap = self.breaker.snapshot()
        metrics.DESTINATION_CIRCUIT.labels(self.key).set(snap.state.gauge)
        metrics.DESTINATION_FAILURES.labels(self.key).set(snap.failures)
        if transition is not None:
            self.on_transition(self.key, transition, snap, why)

    def stop(self) -> None:
        self.stopping.set()


class DeliveryLanes:
    """A lane per configured destination. ``sync()`` (every ``[delivery] interval_s`` and after
    a reload) follows the configuration and, when it changed and every ``ORPHAN_SWEEP_S``,
    dead-letters deliveries to destinations that are no longer configured."""

    ORPHAN_SWEEP_S = 60.0

    def __init__(self, sender: Sender, audit: Callable[[str, str], None] | None = None) -> None:
        self.sender = sender
        self.audit = audit
        self.lanes: dict[str, Lane] = {}
        self.lock = threading.Lock()
        self._swept: tuple[float, tuple[str, ...]] | None = None

    def sync(self) -> None:
        with self.lock:
            wanted = self.sender.destinations()
            for key in [k for k in self.lanes if k not in wanted]:
                self.lanes.pop(key).stop()
                for gauge in (metrics.DESTINATION_CIRCUIT, metrics.DESTINATION_FAILURES):
                    with contextlib.suppress(KeyError):
                        gauge.remove(key)
            for key, dest in wanted.items():
                if key not in self.lanes:
                    self.lanes[key] = Lane(key, self.sender, self._transition)
                self.lanes[key].apply(dest)
            keys = tuple(sorted(wanted))
            if (self._swept is not None and self._swept[1] == keys
                    and time.monotonic() - self._swept[0] < self.ORPHAN_SWEEP_S):
                return
            self._swept = (time.monotonic(), keys)
        while self.sender.dead_letter_unconfigured():
            pass

    def _transition(self, key: str, transition: Transition, snap: CircuitSnapshot,
                    why: str | None) -> None:
        if transition is Transition.REOPENED:
            log.info("%s: probe unanswered, circuit open again; next try in %.0f s", key,
                     self.lanes[key].breaker.cooldown_s if key in self.lanes else 0)
            return
        if transition is Transition.OPENED:
            detail = (f"{key}: {snap.failures} delivery attempts in a row unanswered "
                      f"(last: {why}); not trying for "
                      f"{self.lanes[key].breaker.cooldown_s if key in self.lanes else 0:.0f} s")
            log.warning("circuit opened: %s", detail)
            kind = "circuit_opened"
        else:
            detail = f"{key}: {why}"
            log.info("circuit closed: %s", detail)
            kind = "circuit_closed"
        if self.audit is not None:
            self.audit(kind, detail[:2000])

    def circuits(self) -> list[CircuitSnapshot]:
        with self.lock:
            return [lane.breaker.snapshot() for lane in self.lanes.values()]

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop every lane; waits up to ``grace_s`` for sends under way (a row still being sent
        keeps its lease and is sent again after it expires)."""
        with self.lock:
            lanes = list(self.lanes.values())
        for lane in lanes:
            lane.stop()
        deadline = time.monotonic() + grace_s
        for lane in lanes:
            for t in lane.threads:
                t.join(max(0.0, deadline - time.monotonic()))


def update_series_delivery_state(s: Session, result_id: int) -> None:
    """Series becomes delivered when every delivery of its current result is; failed on a dead one."""
    res = s.get(Result, result_id)
    if res is None:
        return
    states = s.scalars(
        select(Delivery.state).join(Output, Output.id == Delivery.output_id)
        .where(Output.result_id == result_id)
    ).all()
    if not states:
        return
    series = s.get(Series, res.series_id)
    job = s.get(Job, res.job_id)
    if series is None or job is None or job.generation != series.generation:
        return  # an older generation's result; the series has moved on
    if series.state not in (SeriesState.SCORED, SeriesState.DELIVERED, SeriesState.FAILED):
        return
    if all(st == DeliveryState.DELIVERED for st in states):
        if series.state != SeriesState.DELIVERED:
            series.state, series.reason = SeriesState.DELIVERED, None
            metrics.LAST_INSTANCE_TO_DELIVERED.observe(
                max(0.0, (utcnow() - series.last_received_at).total_seconds()))
            s.add(Event(kind="series_delivered", series_instance_uid=series.series_instance_uid,
                        detail=f"{len(states)} object-destination pair(s) delivered"))
    elif any(st == DeliveryState.DEAD for st in states):
        series.state = SeriesState.FAILED
        series.reason = "delivery dead-lettered (see `triage-agent status`; `triage-agent retry`)"


def retry_dead(sessions: sessionmaker[Session], delivery_ids: list[int] | None = None) -> int:
    """Re-queue dead letters (all, or the given ids); returns how many."""
    with sessions() as s, s.begin():
        stmt = select(Delivery).where(Delivery.state == DeliveryState.DEAD)
        if delivery_ids:
            stmt = stmt.where(Delivery.id.in_(delivery_ids))
        rows = s.scalars(stmt).all()
        results = set()
        for d in rows:
            d.state = DeliveryState.PENDING
            d.attempts = 0
            d.next_attempt_at = utcnow()
            d.last_error = None
            results.add(s.scalar(select(Output.result_id).where(Output.id == d.output_id)))
        for rid in results:
            res = s.get(Result, rid)
            if res is not None:
                s.execute(update(Series).where(Series.id == res.series_id,
                                               Series.state == SeriesState.FAILED,
                                               Series.reason.like("delivery%"))
                          .values(state=SeriesState.SCORED, reason=None))
        if rows:
            s.add(Event(kind="deliveries_retried", detail=f"{len(rows)} dead letter(s) re-queued"))
    return len(rows)
