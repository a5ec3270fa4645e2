"""Who may hold a connection or an association slot: socket-level admission for the receiver.

``HardenedServer`` is the pynetdicom association server the receiver runs: a per-address cap on
open connections, and TLS handshakes finished (bounded) off the accept thread.
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)


class HardenedServer(ThreadedAssociationServer):
    """Association server with per-address connection limits, a bounded PDU read and TLS
    handshakes moved off the accept thread (stock pynetdicom handshakes while accepting, so one
    silent TLS client stalls every other sender until the network timeout).

    pynetdicom builds the server itself (``AE.make_server(server_class=...)``), so the settings
    and the connection counts live on a class: ``configured`` makes a fresh subclass per
    receiver, and two receivers in one process never share counts or callbacks.
    """

    max_per_address = 5
    on_refused: Any = None
    # Counted here, not from ae.active_associations: a burst of connections is verified before
    # their association threads exist. Decremented by the EVT_CONN_CLOSE handler.
    open_by_ip: dict[str, int] = {}
    open_lock = threading.Lock()

    @classmethod
    def configured(cls, *, max_per_address: int, on_refused: Any, on_tls_failed: Any,
                   tls_handshake_timeout_s: float) -> type[HardenedServer]:
        return type(cls.__name__, (cls,), {
            "max_per_address": max_per_address, "on_refused": staticmethod(on_refused),
            "on_tls_failed": staticmethod(on_tls_failed),
            "tls_handshake_timeout_s": tls_handshake_timeout_s,
            "open_by_ip": {}, "open_lock": threading.Lock(),
        })

    def get_request(self) -> tuple[Any, tuple[str, int]]:
        client_socket, address = self.socket.accept()  # type: ignore[union-attr]
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False)
        return client_socket, address

    on_tls_failed: Any = None
    tls_handshake_timeout_s: float = 30.0

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Finish the TLS handshake (bounded) before pynetdicom sees the socket, so a failed
        or silent handshake never becomes an association holding a slot until acse_timeout."""
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.tls_handshake_timeout_s)
                request.do_handshake()
                request.settimeout(None)
            except (OSError, ValueError) as e:
                ip = client_address[0] if isinstance(client_address, tuple) else str(client_address)
                self.connection_closed(ip)  # counted by verify_request; no EVT_CONN_CLOSE follows
                self.shutdown_request(request)
                if self.on_tls_failed is not None:
                    self.on_tls_failed(ip, e)
                return
        super().process_request_thread(request, client_address)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        ip = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        with self.open_lock:
            open_from_ip = self.open_by_ip.get(ip, 0)
            if open_from_ip < self.max_per_address:
                self.open_by_ip[ip] = open_from_ip + 1
                return True
        log.warning("connection from %s refused: %d already open (limit %d)", ip,
                    open_from_ip, self.max_per_address)
        if self.on_refused is not None:
            self.on_refused(ip)
        return False

    @classmethod
    def connection_closed(cls, ip: str) -> None:
        with cls.open_lock:
            n = cls.open_by_ip.get(ip, 0) - 1
            if n > 0:
                cls.open_by_ip[ip] = n
            else:
                cls.open_by_ip.pop(ip, None)
