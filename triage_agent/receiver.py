"""pynetdicom SCP: association policy, C-ECHO and the C-STORE handler.

The handler follows the durability contract of RELIABILITY.md: validate, write the file atomically
(fsync, rename, directory fsync), commit the instance row, and only then answer Success. Every
failure class has its own status so a modality's log says what went wrong.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    Verification,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from triage_agent import ingest, metrics
from triage_agent.config import AgentConfig
from triage_agent.storage import Storage, StorageFullError

log = logging.getLogger(__name__)

# Never let pynetdicom log identifiers from requests/responses (patient names, IDs).
pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False

IMAGE_SOP_CLASSES = (str(CTImageStorage), str(EnhancedCTImageStorage))
# Deflated is deliberately absent: pynetdicom inflates it without a size bound.
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, RLELossless]
assert not set(TRANSFER_SYNTAXES) - set(ALL_TRANSFER_SYNTAXES)

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class Status:
    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_MISMATCH = 0xA900
    CANNOT_DECODE = 0xC210
    INVALID_UID = 0xC220
    NOT_ACCEPTED = 0xC230


def valid_uid(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 64 and bool(UID_RE.match(value))


@dataclass
class Receiver:
    """Binds config, storage and the session factory to the pynetdicom handlers."""

    cfg: AgentConfig
    storage: Storage
    sessions: sessionmaker[Session]
    ae: AE = field(init=False)
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.ae = build_ae(self.cfg)

    @property
    def accepted_sop_classes(self) -> set[str]:
        return set(IMAGE_SOP_CLASSES) | set(self.cfg.storage.extra_sop_classes)

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, handle_requested, [self]),
            (evt.EVT_ACCEPTED, handle_accepted, [self]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self]),
        ]

    def start(self) -> None:
        node = self.cfg.node
        self._server = self.ae.start_server(
            (node.bind_address, node.port),
            block=False,
            evt_handlers=self.handlers(),
            ssl_context=build_ssl_context(self.cfg),
        )
        log.info("listening as %s on %s:%d", node.ae_title, node.bind_address, self.port)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else self.cfg.node.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def build_ae(cfg: AgentConfig) -> AE:
    node = cfg.node
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    ae.network_timeout = node.network_timeout_s
    ae.maximum_pdu_size = node.max_pdu_bytes
    ae.add_supported_context(Verification)
    for uid in (*IMAGE_SOP_CLASSES, *cfg.storage.extra_sop_classes):
        ae.add_supported_context(uid, TRANSFER_SYNTAXES)
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
    req = event.assoc.requestor
    return (req.ae_title or "").strip(), str(req.address)


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
    if reject is None:
        return
    metrics.ASSOCIATIONS.labels("rejected", label).inc()
    event.assoc.acse.send_reject(*reject)
    log.warning("association rejected: %s", why)
    ingest.audit(rx.sessions, "association_rejected", calling_ae=calling, source_address=address,
                 detail=why, flagged=True)


def handle_accepted(event: Any, rx: Receiver) -> None:
    calling, address = _peer(event)
    metrics.ASSOCIATIONS.labels("accepted", "").inc()
    log.info("association accepted from %s at %s", calling, address)
    ingest.audit(rx.sessions, "association_accepted", calling_ae=calling, source_address=address)


def handle_echo(event: Any) -> int:
    return Status.SUCCESS


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def handle_store(event: Any, rx: Receiver) -> Dataset | int:
    """Validate, persist, record, return (RELIABILITY.md promises 1, 3, 5)."""
    calling, address = _peer(event)
    req = event.request
    sop_class = str(req.AffectedSOPClassUID or "")
    sop_uid = str(req.AffectedSOPInstanceUID or "")
    ts = str(event.context.transfer_syntax)

    def refuse(status: int, comment: str, kind: str = "store_failed") -> Dataset:
        metrics.INSTANCES.labels(f"0x{status:04X}").inc()
        log.warning("C-STORE refused (0x%04X): %s", status, comment)
        ingest.audit(rx.sessions, kind, calling_ae=calling, source_address=address,
                     sop_instance_uid=sop_uid if valid_uid(sop_uid) else None, status=status,
                     detail=comment, flagged=True)
        return _failure(status, comment)

    if not valid_uid(sop_uid) or not valid_uid(sop_class):
        return refuse(Status.INVALID_UID, "Affected SOP Instance/Class UID is not a valid UID")
    if sop_class not in rx.accepted_sop_classes:
        return refuse(Status.NOT_ACCEPTED, "SOP class not accepted by this node")

    try:
        info = ingest.inspect_dataset(event.dataset, sop_class, sop_uid, ts)
    except ingest.DatasetMismatch as e:
        return refuse(Status.DATASET_MISMATCH, str(e))
    except ingest.InvalidUID as e:
        return refuse(Status.INVALID_UID, str(e))
    except Exception as e:  # pydicom raises many types on broken input; all mean "cannot decode"
        return refuse(Status.CANNOT_DECODE, f"cannot decode dataset: {e.__class__.__name__}")

    info.calling_ae = calling
    info.source_address = address
    try:
        rx.storage.check_space()
        outcome = ingest.persist(rx.storage, rx.sessions, info, event.encoded_dataset(False),
                                 ignored=sop_class not in IMAGE_SOP_CLASSES)
    except StorageFullError as e:
        return refuse(Status.OUT_OF_RESOURCES, str(e), kind="storage_full")
    except OSError as e:
        return refuse(Status.OUT_OF_RESOURCES, f"storage error: {e.strerror or e}")
    except SQLAlchemyError as e:
        return refuse(Status.OUT_OF_RESOURCES, f"database error: {e.__class__.__name__}")
    metrics.INSTANCES.labels(outcome).inc()
    log.debug("instance %s: %s", info.log_id, outcome)
    return Status.SUCCESS
