"""Delivery of result objects: C-STORE SCU with every status checked, retries, dead letters.

One row per object and destination (``deliveries``) is the unit of retry. The scheduler calls
``Sender.run_once`` every ``[delivery] interval_s``; a claim takes a lease so that two processes
never send the same row at once, and a crash mid-send only means the row is sent again (the
object's UID is fixed, so the PACS sees the same instance, not a new one).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import ssl
from collections import defaultdict
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from triage_agent import metrics
from triage_agent.config import AgentConfig, DestinationConfig, HL7DestinationConfig
from triage_agent.delivery import DELIVERED, PERMANENT, TRANSIENT, Outcome, SendOutcome
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
        return [SendOutcome(kind, None, why)] * len(files)
    if not assoc.is_established:
        why = (f"TLS handshake failed: {trap.error}" if trap.error else
               "association aborted or refused" + (" (TLS: check certificates and the peer's log)"
                                                   if dest.tls else ""))
        return [SendOutcome(TRANSIENT, None, why)] * len(files)
    outcomes: list[SendOutcome] = []
    try:
        accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
        for ds in datasets:
            if str(ds.SOPClassUID) not in accepted:
                outcomes.append(SendOutcome(PERMANENT, None,
                                            f"destination does not accept SOP class {ds.SOPClassUID}"))
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


class Sender:
    def __init__(self, cfg: AgentConfig, sessions: sessionmaker[Session], storage: Storage) -> None:
        self.cfg = cfg
        self.sessions = sessions
        self.storage = storage

    def backoff_s(self, attempts: int) -> float:
        d = self.cfg.delivery
        delay = min(d.backoff_cap_s, d.backoff_base_s * 2 ** max(0, attempts - 1))
        return delay * random.uniform(0.5, 1.0)

    def run_once(self, limit: int = 50) -> int:
        """Claim due deliveries, send them grouped by destination; returns how many were tried."""
        now = utcnow()
        dests: dict[str, DestinationConfig | HL7DestinationConfig] = {
            destination_key(d): d for d in self.cfg.destinations}
        dests.update({hl7_destination_key(d): d for d in self.cfg.hl7_destinations})
        lease = dt.timedelta(seconds=self.cfg.delivery.timeout_s * 4 + 60)
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
            if s.get_bind().dialect.name == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True, of=Delivery)
            rows = s.execute(stmt).all()
            batch: dict[str, list[tuple[int, Path]]] = defaultdict(list)
            for d, path in rows:
                d.state = DeliveryState.SENDING
                d.lease_until = now + lease
                d.attempts += 1
                batch[d.destination].append((d.id, self.storage.abspath(path)))
        for key, items in batch.items():
            dest = dests.get(key)
            if dest is None:
                outcomes = [SendOutcome(PERMANENT, None, "destination no longer configured")] * len(items)
            else:
                existing = [(i, p) for i, p in items if p.exists()]
                gone = [(i, p) for i, p in items if not p.exists()]
                outcomes_by_id = {i: SendOutcome(PERMANENT, None, "output file missing") for i, _ in gone}
                if existing:
                    paths = [p for _, p in existing]
                    sent = (_send_hl7(dest, paths) if isinstance(dest, HL7DestinationConfig) else
                            send_files(dest, paths, calling_ae=self.cfg.node.ae_title,
                                       timeout_s=self.cfg.delivery.timeout_s))
                    outcomes_by_id.update({i: o for (i, _), o in zip(existing, sent, strict=True)})
                outcomes = [outcomes_by_id[i] for i, _ in items]
            self._record(key, [i for i, _ in items], outcomes)
        return sum(len(v) for v in batch.values())

    def _record(self, dest_key: str, ids: list[int], outcomes: list[SendOutcome]) -> None:
        max_attempts = self.cfg.delivery.max_attempts
        touched_results: set[int] = set()
        with self.sessions() as s, s.begin():
            for did, out in zip(ids, outcomes, strict=True):
                d = s.get(Delivery, did)
                if d is None:
                    continue
                d.last_status = out.status
                d.lease_until = None
                metrics.DELIVERIES.labels(
                    "delivered" if out.kind == DELIVERED else
                    "dead" if out.kind == PERMANENT or d.attempts >= max_attempts else "retry").inc()
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
