"""Who may hold a connection or an association slot on the receiver.

Admission runs in two steps, so that one host's flood never turns a listed modality away:

1. **Connection** (``HardenedServer``, before a byte is read): the listener holds at most
   ``pending_limit`` connections that have not been admitted yet; beyond that it is saturated and
   closes new connections at once (the only refusal without an A-ASSOCIATE-RJ: nothing has been
   read to answer). A connection from an address that already holds
   ``max_connections_per_address`` unlisted ones must show a complete A-ASSOCIATE-RQ header
   within ``IDENTIFY_WITHIN_S`` or is closed, so slow-drip senders cannot pile up; a modality on
   that host sends its request at once and goes on to step 2. (TLS bytes cannot be peeked before
   pynetdicom reads them: over the cap, a TLS connection is closed at once.)
2. **Association** (``Admission.admit``, from EVT_REQUESTED, once the calling AE title is known):
   a listed caller (``[security] priority_ae_titles`` / ``priority_networks``) may take any of
   ``max_associations`` slots; an unlisted one only ``max_associations - reserved_slots`` of
   them, and at most ``max_connections_per_address`` from one address. A refusal is an
   A-ASSOCIATE-RJ, rejected-transient, service provider (presentation), local-limit-exceeded.

Every refusal is logged and counted per calling host in ``triage_admission_refused_total``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from triage_agent import metrics
from triage_agent.config import NodeConfig

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: rejected-transient (2), DUL service provider, presentation related (3),
# local-limit-exceeded (2): "try again later", what pynetdicom answers at its own limit.
LOCAL_LIMIT_EXCEEDED = (2, 3, 2)
# An A-ASSOCIATE-RQ's fixed part: PDU header (6), version, reserved, called and calling AE titles,
# reserved (68). A modality writes its whole request at once, right after connecting.
RQ_HEADER_BYTES = 74
IDENTIFY_WITHIN_S = 0.4
# Distinct calling hosts labelled in the refusal metric; the rest count as "other".
MAX_HOST_LABELS = 256

PENDING, GENERAL, PRIORITY = "pending", "general", "priority"


@dataclass
class Refusal:
    reject: tuple[int, int, int]
    reason: str  # metric label
    why: str  # log and audit text (addresses and AE titles, never patient identifiers)


@dataclass
class Admission:
    """Connection and association counts of one receiver, and the policy that reads them."""

    max_associations: int
    reserved_slots: int
    max_per_address: int
    pending_limit: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Connections not admitted (yet): before their A-ASSOCIATE-RQ, or rejected and closing.
    pending: dict[str, int] = field(default_factory=dict)
    # Associations admitted for unlisted callers, by address; and for listed callers.
    general: dict[str, int] = field(default_factory=dict)
    priority: int = 0
    _host_labels: set[str] = field(default_factory=set)

    @classmethod
    def from_config(cls, node: NodeConfig) -> Admission:
        return cls(max_associations=node.max_associations, reserved_slots=node.reserved_slots,
                   max_per_address=node.max_connections_per_address,
                   pending_limit=pending_limit(node))

    # -- step 1: connections --------------------------------------------------------------------

    def connection_opened(self, ip: str) -> str:
        """Count a new connection: "ok", "identify" (over the per-address cap: must show its
        request at once) or "saturated" (not counted; close it)."""
        with self.lock:
            if sum(self.pending.values()) >= self.pending_limit:
                return "saturated"
            held = self.pending.get(ip, 0) + self.general.get(ip, 0)
            self.pending[ip] = self.pending.get(ip, 0) + 1
        return "identify" if held >= self.max_per_address else "ok"

    def pending_closed(self, ip: str) -> None:
        """A connection that never became an association closed (TLS failure, no request)."""
        with self.lock:
            _decrement(self.pending, ip)

    # -- step 2: associations -------------------------------------------------------------------

    def admit(self, assoc: Any, address: str, *, listed: bool, reserve: bool) -> Refusal | None:
        """Give the association a slot (recorded on it for ``release``) or say why not.

        ``listed``: the caller is a listed modality; ``reserve``: some caller is listed, so
        ``reserved_slots`` are kept for them (with nobody listed, nothing is held back)."""
        refusal = None
        with self.lock:
            if getattr(assoc, "triage_closed", False):
                return None  # gone already; nothing to hold
            general = sum(self.general.values())
            in_use = general + self.priority
            general_limit = self.max_associations - (self.reserved_slots if reserve else 0)
            if listed:
                if in_use >= self.max_associations:
                    refusal = Refusal(LOCAL_LIMIT_EXCEEDED, "association_limit",
                                      f"all {self.max_associations} association slots in use "
                                      f"(caller at {address})")
            elif general >= general_limit:
                refusal = Refusal(LOCAL_LIMIT_EXCEEDED, "unlisted_limit",
                                  f"all {general_limit} association slots for unlisted callers "
                                  f"in use (caller at {address})")
            elif self.general.get(address, 0) >= self.max_per_address:
                refusal = Refusal(LOCAL_LIMIT_EXCEEDED, "per_address_limit",
                                  f"{address} already holds {self.max_per_address} associations "
                                  f"(per-address limit)")
            if refusal is None:
                _decrement(self.pending, address)
                if listed:
                    self.priority += 1
                    assoc.triage_slot = PRIORITY
                else:
                    self.general[address] = self.general.get(address, 0) + 1
                    assoc.triage_slot = GENERAL
        if refusal is not None:
            self.count_refusal(address, refusal.reason)
        return refusal

    def release(self, assoc: Any) -> None:
        """Give back what a closed association held, once (EVT_CONN_CLOSE or the watchdog)."""
        if getattr(assoc, "triage_server_class", None) is None:
            return  # never opened through a receiver: nothing was counted
        ip = str(assoc.requestor.address)
        with self.lock:
            if getattr(assoc, "triage_closed", True):
                return
            assoc.triage_closed = True
            slot = getattr(assoc, "triage_slot", PENDING)
            if slot == PRIORITY:
                self.priority = max(0, self.priority - 1)
            elif slot == GENERAL:
                _decrement(self.general, ip)
            else:
                _decrement(self.pending, ip)

    def in_use(self) -> dict[str, int]:
        with self.lock:
            return {PENDING: sum(self.pending.values()), GENERAL: sum(self.general.values()),
                    PRIORITY: self.priority}

    def count_refusal(self, address: str, reason: str) -> None:
        with self.lock:
            if address not in self._host_labels and len(self._host_labels) < MAX_HOST_LABELS:
                self._host_labels.add(address)
            host = address if address in self._host_labels else "other"
        metrics.ADMISSION_REFUSED.labels(host, reason).inc()


def pending_limit(node: NodeConfig) -> int:
    """Connections the listener holds before they are admitted: twice max_associations."""
    return 2 * node.max_associations


def association_ceiling(node: NodeConfig) -> int:
    """pynetdicom's own ``maximum_associations``: above anything admission lets through (it
    counts every association thread, admitted or not), so that admission decides, not it."""
    return node.max_associations + pending_limit(node) + node.max_associations


def _decrement(counts: dict[str, int], key: str) -> None:
    n = counts.get(key, 0) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


def peek_request_header(sock: socket.socket, timeout_s: float) -> bool:
    """True when a complete A-ASSOCIATE-RQ header arrives within ``timeout_s`` (read with
    MSG_PEEK: pynetdicom still reads the request itself)."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            sock.settimeout(left)
            data = sock.recv(RQ_HEADER_BYTES, socket.MSG_PEEK)
            if not data:
                return False  # closed
            if data[0] != 0x01:
                return True  # not a request: pynetdicom answers it (with an abort)
            if len(data) >= RQ_HEADER_BYTES:
                return True
            time.sleep(0.01)
    except (OSError, ValueError):
        return False
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(None)


class HardenedServer(ThreadedAssociationServer):
    """Association server with connection admission (step 1 above), a bounded PDU read and TLS
    handshakes moved off the accept thread (stock pynetdicom handshakes while accepting, so one
    silent TLS client stalls every other sender until the network timeout).

    pynetdicom builds the server itself (``AE.make_server(server_class=...)``), so the settings
    and the counts live on a class: ``configured`` makes a fresh subclass per receiver, and two
    receivers in one process never share counts or callbacks.
    """

    admission: Admission = Admission(max_associations=10, reserved_slots=0, max_per_address=5,
                                     pending_limit=20)
    # on_refused(ip, reason): a connection closed before it became an association.
    on_refused: Any = None
    on_tls_failed: Any = None
    tls_handshake_timeout_s: float = 30.0
    # Connections over the per-address cap that must show their request at once (by id()).
    must_identify: set[int] = set()

    @classmethod
    def configured(cls, *, admission: Admission, on_refused: Any, on_tls_failed: Any,
                   tls_handshake_timeout_s: float) -> type[HardenedServer]:
        return type(cls.__name__, (cls,), {
            "admission": admission, "on_refused": staticmethod(on_refused),
            "on_tls_failed": staticmethod(on_tls_failed),
            "tls_handshake_timeout_s": tls_handshake_timeout_s, "must_identify": set(),
        })

    def get_request(self) -> tuple[Any, tuple[str, int]]:
        client_socket, address = self.socket.accept()  # type: ignore[union-attr]
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False)
        return client_socket, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Runs on the accept thread, in connection order: count, or close when saturated."""
        ip = _ip(client_address)
        verdict = self.admission.connection_opened(ip)
        if verdict == "saturated":
            self._refused(ip, "listener_saturated",
                          f"listener saturated: {self.admission.pending_limit} connections "
                          f"waiting for admission")
            return False
        if verdict == "identify":
            with self.admission.lock:
                self.must_identify.add(id(request))
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Finish the TLS handshake (bounded) and, over the per-address cap, wait briefly for the
        association request, before pynetdicom sees the socket: a failed or silent peer never
        becomes an association holding a slot until acse_timeout."""
        ip = _ip(client_address)
        with self.admission.lock:
            identify = id(request) in self.must_identify
            self.must_identify.discard(id(request))
        if isinstance(request, ssl.SSLSocket):
            if identify:
                self._close(request, ip, "per_address_limit",
                            f"{self.admission.max_per_address} connections already open from "
                            f"{ip} (TLS)")
                return
            try:
                request.settimeout(self.tls_handshake_timeout_s)
                request.do_handshake()
                request.settimeout(None)
            except (OSError, ValueError) as e:
                self.admission.pending_closed(ip)  # no EVT_CONN_CLOSE follows
                self.shutdown_request(request)
                if self.on_tls_failed is not None:
                    self.on_tls_failed(ip, e)
                return
        elif identify and not peek_request_header(request, IDENTIFY_WITHIN_S):
            self._close(request, ip, "per_address_limit",
                        f"{self.admission.max_per_address} connections already open from {ip} "
                        f"and no association request within {IDENTIFY_WITHIN_S:g} s")
            return
        super().process_request_thread(request, client_address)

    def _close(self, request: Any, ip: str, reason: str, why: str) -> None:
        self.admission.pending_closed(ip)
        self.shutdown_request(request)
        self._refused(ip, reason, why)

    def _refused(self, ip: str, reason: str, why: str) -> None:
        log.warning("connection from %s closed: %s", ip, why)
        self.admission.count_refusal(ip, reason)
        if self.on_refused is not None:
            self.on_refused(ip, reason, why)


def _ip(client_address: Any) -> str:
    return client_address[0] if isinstance(client_address, tuple) else str(client_address)
