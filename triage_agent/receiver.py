"""pynetdicom SCP: association policy, C-ECHO and the C-STORE handler.

The handler follows the durability contract of docs/reliability.md: validate, write the file
atomically (fsync, rename, directory fsync), commit the instance row, and only then answer
Success. Every failure class has its own status so a modality's log says what went wrong.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from triage_agent import db, ingest, metrics, pynetdicom_compat
from triage_agent.admission import Admission, HardenedServer, association_ceiling
from triage_agent.audit import SPOOL_NAME, AuditLog
from triage_agent.config import AgentConfig
from triage_agent.dicom_uids import IMAGE_SOP_CLASSES, valid_uid
from triage_agent.storage import Storage, StorageFullError
from triage_agent.transfer_syntax import (
    ACCEPTED_TRANSFER_SYNTAXES,
    DatasetTooLarge,
    metric_label,
    received_dataset,
    refused_proposals,
    summarise,
)

log = logging.getLogger(__name__)

# Never let pynetdicom log identifiers from requests/responses (patient names, IDs), and
# never read a PDU longer than the receiver allows (cap set per association on EVT_CONN_OPEN).
pynetdicom_compat.hide_identifiers_in_logs()
pynetdicom_compat.install_bounded_recv()

class Status:
    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_MISMATCH = 0xA900
    CANNOT_DECODE = 0xC210
    INVALID_UID = 0xC220
    NOT_ACCEPTED = 0xC230


# Longest PDU a peer may declare when we advertised "unlimited" (max_pdu_bytes = 0), and the
# slack for the P-DATA item headers around a PDU of our advertised maximum length.
UNLIMITED_PDU_CAP = 64 * 1024 * 1024
PDU_SLACK = 4096


@dataclass
class Receiver:
    """Binds config, storage and the session factory to the pynetdicom handlers."""

    cfg: AgentConfig
    storage: Storage
    sessions: sessionmaker[Session]
    # Association audit events go through it, never straight to the database (audit.py).
    audit: AuditLog = None  # type: ignore[assignment]  # None: __post_init__ makes one
    ae: AE = field(init=False)
    _server: Any = None
    _server_class: type[HardenedServer] = HardenedServer
    _stopped: threading.Event = field(default_factory=threading.Event)
    _tracked: set[Any] = field(default_factory=set)
    _tracked_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.ae = build_ae(self.cfg)
        if self.audit is None:  # App passes the node's; a bare receiver keeps its own
            self.audit = AuditLog(self.sessions, self.storage.root / SPOOL_NAME)

    @property
    def accepted_sop_classes(self) -> set[str]:
        return set(IMAGE_SOP_CLASSES) | set(self.cfg.storage.extra_sop_classes)

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_CONN_OPEN, handle_conn_open, [self]),
            (evt.EVT_CONN_CLOSE, handle_conn_close, [self]),
            (evt.EVT_PDU_RECV, handle_pdu_recv, [self]),
            (evt.EVT_REQUESTED, handle_requested, [self]),
            (evt.EVT_ACCEPTED, handle_accepted, [self]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self]),
        ]

    @property
    def max_read(self) -> int:
        pdu = self.cfg.node.max_pdu_bytes
        return pdu + PDU_SLACK if pdu else UNLIMITED_PDU_CAP

    def start(self) -> None:
        node = self.cfg.node
        self._server_class = HardenedServer.configured(
            admission=Admission.from_config(node), on_refused=self._refused_connection,
            on_tls_failed=self._tls_failed, tls_handshake_timeout_s=node.acse_timeout_s)
        threading.Thread(target=self._watchdog, name="association-watchdog", daemon=True).start()
        self._server = self.ae.make_server(
            (node.bind_address, node.port),
            evt_handlers=self.handlers(),
            ssl_context=build_ssl_context(self.cfg),
            server_class=self._server_class,
        )
        pynetdicom_compat.register_server(self.ae, self._server)
        threading.Thread(target=self._server.serve_forever, name="acceptor", daemon=True).start()
        log.info("listening as %s on %s:%d", node.ae_title, node.bind_address, self.port)

    def _tls_failed(self, ip: str, err: Exception) -> None:
        log.warning("TLS handshake with %s failed: %s", ip, err)
        metrics.ASSOCIATIONS.labels("refused", "tls").inc()
        self.audit.record("tls_refused", source_address=ip,
                          detail=f"TLS handshake failed: {err}"[:2000], flagged=True)

    @property
    def admission(self) -> Admission:
        return self._server_class.admission

    def _refused_connection(self, ip: str, reason: str, why: str) -> None:
        metrics.ASSOCIATIONS.labels("refused", reason).inc()
        self.audit.record("connection_refused", source_address=ip, detail=why, flagged=True)

    def _watchdog(self) -> None:
        """Abort associations past their wall-clock limit or idle (no complete PDU); kill those
        an abort did not end; release the per-address slots of finished ones."""
        while not self._stopped.wait(0.5):
            node = self.cfg.node
            now = time.monotonic()
            with self._tracked_lock:
                tracked = list(self._tracked)
            for assoc in tracked:
                if not assoc.is_alive():
                    _release_slot(assoc)
                    with self._tracked_lock:
                        self._tracked.discard(assoc)
                    continue
                started = getattr(assoc, "triage_started", None)
                last = getattr(assoc, "triage_last_pdu", started)
                if started is None:
                    continue
                aborting_since = getattr(assoc, "triage_aborting_since", None)
                if aborting_since is not None:
                    if now - aborting_since > 3.0:
                        _hard_kill(assoc)
                    continue
                why = None
                if now - started > node.max_association_s:
                    why = f"association longer than {node.max_association_s:g} s"
                elif last is not None and now - last > node.idle_timeout_s:
                    why = f"no complete PDU for {node.idle_timeout_s:g} s"
                if why and not getattr(assoc, "triage_aborting", False):
                    assoc.triage_aborting = True
                    assoc.triage_aborting_since = now
                    address = str(getattr(assoc.requestor, "address", ""))
                    log.warning("aborting association from %s: %s", address, why)
                    metrics.ASSOCIATIONS.labels("aborted", "limit").inc()
                    self.audit.record("association_aborted", source_address=address,
                                      detail=why, flagged=True)
                    _abort(assoc)

    def reload_tls(self, old: AgentConfig, new: AgentConfig) -> None:
        """Use the new certificates for the next connections (get_request reads the context
        per connection); switching TLS on or off still needs a restart."""
        if self._server is not None and (old.security.tls is None) == (new.security.tls is None):
            self._server.ssl_context = build_ssl_context(new)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else self.cfg.node.port

    def stop(self) -> None:
        self._stopped.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            pynetdicom_compat.forget_server(self.ae, self._server)
            self._server = None


def build_ae(cfg: AgentConfig) -> AE:
    node = cfg.node
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = association_ceiling(node)  # admission enforces max_associations
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    ae.network_timeout = node.network_timeout_s
    ae.maximum_pdu_size = node.max_pdu_bytes
    ae.add_supported_context(Verification)
    for uid in (*IMAGE_SOP_CLASSES, *cfg.storage.extra_sop_classes):
        ae.add_supported_context(uid, list(ACCEPTED_TRANSFER_SYNTAXES))
    return ae


def build_ssl_context(cfg: AgentConfig) -> ssl.SSLContext | None:
    tls = cfg.security.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca_certificate))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return ctx


def _peer(event: Any) -> tuple[str, str]:
    return _peer_of(event.assoc)


def _peer_of(assoc: Any) -> tuple[str, str]:
    req = assoc.requestor
    return (req.ae_title or "").strip(), str(req.address)


def _abort(assoc: Any) -> None:
    """Cut the connection, then let pynetdicom wind the association down.

    The socket goes first: a DUL thread blocked in recv() on a slow-drip peer only notices a
    closed socket, and ``Association.abort()`` waits for that thread.
    """
    pynetdicom_compat.shutdown_socket(assoc)
    threading.Thread(target=_quiet_abort, args=(assoc,), daemon=True).start()


def _quiet_abort(assoc: Any) -> None:
    try:
        if assoc.is_established:
            assoc.abort()
    except Exception:
        log.debug("abort failed", exc_info=True)


def handle_conn_open(event: Any, rx: Receiver) -> None:
    # Before its threads start: they wait for events instead of polling every millisecond.
    pynetdicom_compat.use_event_driven_reactors(event.assoc)
    event.assoc.triage_server_class = rx._server_class
    event.assoc.triage_closed = False
    with rx._tracked_lock:
        rx._tracked.add(event.assoc)
    event.assoc.triage_started = time.monotonic()
    event.assoc.triage_last_pdu = event.assoc.triage_started
    event.assoc.triage_message_bytes = 0
    pynetdicom_compat.set_read_cap(event.assoc, rx.max_read)


def _release_slot(assoc: Any) -> None:
    """Give back the association's slot once (on close, or when the watchdog finds it dead)."""
    server_class = getattr(assoc, "triage_server_class", None)
    if server_class is not None:  # else never opened through a receiver: nothing was counted
        server_class.admission.release(assoc)


def _hard_kill(assoc: Any) -> None:
    """Stop an association's threads when an abort did not (e.g. a DUL waiting on its ARTIM
    timer after a protocol error): it must not hold an association slot until it expires."""
    log.warning("killing association from %s that did not end after abort",
                getattr(assoc.requestor, "address", "?"))
    pynetdicom_compat.hard_kill(assoc)


def handle_conn_close(event: Any, rx: Receiver) -> None:
    if event.assoc.is_acceptor:
        _release_slot(event.assoc)
        if getattr(event.assoc, "triage_accepted", False):
            _trace_refusals(event.assoc, rx)


def _trace_refusals(assoc: Any, rx: Receiver) -> None:
    """Count and audit what the association could not carry (see transfer_syntax.py for which
    refusals are worth it), once, when it closes."""
    proposed = assoc.requestor.primitive.presentation_context_definition_list or []
    refused = refused_proposals(proposed, sorted(rx.accepted_sop_classes),
                                [cx.context_id for cx in assoc.accepted_contexts],
                                getattr(assoc, "triage_stores", 0))
    if not refused:
        return
    for r in refused:
        metrics.REFUSED_PROPOSALS.labels(r.reason, metric_label(r.sop_class),
                                         metric_label(r.transfer_syntaxes[0]
                                                      if r.transfer_syntaxes else "")).inc()
    calling, address = _peer_of(assoc)
    detail = summarise(refused)
    log.warning("association from %s could not carry: %s", calling, detail)
    rx.audit.record("contexts_refused", calling_ae=calling, source_address=address,
                    detail=detail, flagged=True)


def handle_pdu_recv(event: Any, rx: Receiver) -> None:
    assoc = event.assoc
    assoc.triage_last_pdu = time.monotonic()
    pdu = event.pdu
    items = getattr(pdu, "presentation_data_value_items", None)
    if not items:
        return
    for item in items:
        data = item.presentation_data_value or b""
        assoc.triage_message_bytes = getattr(assoc, "triage_message_bytes", 0) + len(data)
        # Message control header: bit 1 set and bit 0 set = last fragment of a dataset.
        if data and data[0] & 0x02:
            assoc.triage_message_bytes = 0
    cap = rx.cfg.node.max_dataset_mb * 1024 * 1024
    if assoc.triage_message_bytes > cap and not getattr(assoc, "triage_aborting", False):
        assoc.triage_aborting = True
        assoc.triage_aborting_since = time.monotonic()
        log.warning("aborting association: dataset larger than %g MB", rx.cfg.node.max_dataset_mb)
        metrics.ASSOCIATIONS.labels("aborted", "dataset_size").inc()
        rx.audit.record("association_aborted",
                        source_address=str(assoc.requestor.address),
                        detail=f"dataset larger than {rx.cfg.node.max_dataset_mb:g} MB",
                        flagged=True)
        _abort(assoc)


def handle_requested(event: Any, rx: Receiver) -> None:
    """Association policy: reject with the right A-ASSOCIATE-RJ reason and audit why."""
    primitive = event.assoc.requestor.primitive
    calling = (primitive.calling_ae_title or "").strip()
    called = (primitive.called_ae_title or "").strip()
    address = str(event.assoc.requestor.address)
    sec = rx.cfg.security
    reject: tuple[int, int, int] | None = None
    why = label = ""
    if called != rx.cfg.node.ae_title:
        reject, label, why = (1, 1, 7), "called_ae", f"called AE title {called!r} is not ours"
    elif not sec.calling_ae_allowed(calling):
        reject, label, why = (1, 1, 3), "calling_ae", f"calling AE title {calling!r} not allowed"
    elif not sec.address_allowed(address):
        reject, label, why = (1, 1, 1), "source_address", f"source address {address} not allowed"
    elif refusal := rx.admission.admit(event.assoc, address, reserve=sec.lists_priority_callers,
                                       listed=sec.priority_listed(calling, address)):
        reject, label, why = refusal.reject, refusal.reason, refusal.why
    if reject is None:
        return
    metrics.ASSOCIATIONS.labels("rejected", label).inc()
    pynetdicom_compat.send_reject(event.assoc, *reject)
    pynetdicom_compat.wait_reject_sent(event.assoc)
    log.warning("association rejected: %s", why)
    rx.audit.record("association_rejected", calling_ae=calling, source_address=address,
                    detail=why, flagged=True)


def handle_accepted(event: Any, rx: Receiver) -> None:
    calling, address = _peer(event)
    event.assoc.triage_accepted = True
    metrics.ASSOCIATIONS.labels("accepted", "").inc()
    log.info("association accepted from %s at %s", calling, address)
    rx.audit.record("association_accepted", calling_ae=calling, source_address=address)


def handle_echo(event: Any) -> int:
    return Status.SUCCESS


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def handle_store(event: Any, rx: Receiver) -> Dataset | int:
    """Validate, persist, record, return (docs/reliability.md, promises 1, 3, 6)."""
    calling, address = _peer(event)
    req = event.request
    sop_class = str(req.AffectedSOPClassUID or "")
    sop_uid = str(req.AffectedSOPInstanceUID or "")
    ts = str(event.context.transfer_syntax)
    event.assoc.triage_stores = getattr(event.assoc, "triage_stores", 0) + 1

    def refuse(status: int, comment: str, kind: str = "store_failed") -> Dataset:
        metrics.INSTANCES.labels(f"0x{status:04X}").inc()
        log.warning("C-STORE refused (0x%04X): %s", status, comment)
        rx.audit.record(kind, calling_ae=calling, source_address=address,
                        sop_instance_uid=sop_uid if valid_uid(sop_uid) else None, status=status,
                        detail=comment, flagged=True)
        return _failure(status, comment)

    if not valid_uid(sop_uid) or not valid_uid(sop_class):
        return refuse(Status.INVALID_UID, "Affected SOP Instance/Class UID is not a valid UID")
    if sop_class not in rx.accepted_sop_classes:
        return refuse(Status.NOT_ACCEPTED, "SOP class not accepted by this node")

    try:
        dataset = received_dataset(event, int(rx.cfg.node.max_dataset_mb * 1024 * 1024))
        info = ingest.inspect_dataset(dataset, sop_class, sop_uid, ts)
    except DatasetTooLarge as e:
        return refuse(Status.OUT_OF_RESOURCES, str(e))
    except ingest.DatasetMismatch as e:
        return refuse(Status.DATASET_MISMATCH, str(e))
    except ingest.InvalidUID as e:
        return refuse(Status.INVALID_UID, str(e))
    except Exception as e:  # pydicom raises many types on broken input; all mean "cannot decode"
        return refuse(Status.CANNOT_DECODE, f"cannot decode dataset: {e.__class__.__name__}")

    info.calling_ae = calling
    info.source_address = address
    commit_timeout_s = rx.cfg.storage.store_commit_timeout_s
    try:
        rx.storage.check_space()
        # Every wait for a database lock ends by the deadline: a modality hears 0xA700 and
        # retries instead of timing out while someone else holds the database.
        with db.lock_wait_deadline(commit_timeout_s):
            outcome = ingest.persist(rx.storage, rx.sessions, info, event.encoded_dataset(False),
                                     ignored=sop_class not in IMAGE_SOP_CLASSES,
                                     audit_event=rx.audit.record)
    except StorageFullError as e:
        return refuse(Status.OUT_OF_RESOURCES, str(e), kind="storage_full")
    except OSError as e:
        return refuse(Status.OUT_OF_RESOURCES, f"storage error: {e.strerror or e}")
    except SQLAlchemyError as e:
        if db.is_lock_timeout(e):
            return refuse(Status.OUT_OF_RESOURCES,
                          f"database busy: not stored within {commit_timeout_s:g} s, retry")
        return refuse(Status.OUT_OF_RESOURCES, f"database error: {e.__class__.__name__}")
    metrics.INSTANCES.labels(outcome).inc()
    log.debug("instance %s: %s", info.log_id, outcome)
    return Status.SUCCESS
