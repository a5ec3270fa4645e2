"""Every use of pynetdicom's private internals, in one place.

The receiver needs a few things pynetdicom has no public API for: a bounded PDU read, a hard
stop for an association an abort did not end, registering a server it built itself with the AE,
and keeping identifiers out of pynetdicom's own log. Each lives here as a small function, so a
pynetdicom upgrade has one module to review. ``tests/test_pynetdicom_compat.py`` asserts that
every private attribute used below still exists, and fails loudly when one disappears.

Importing the module checks the installed version: outside ``SUPPORTED`` it raises, outside
``TESTED`` (but supported) it warns.
"""

from __future__ import annotations

import socket
import time
import warnings
from typing import Any

import pynetdicom
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.transport import AssociationSocket

# [lower, upper) as (major, minor, patch). SUPPORTED matches pyproject's pin; TESTED is what the
# private-attribute test has been run against.
SUPPORTED = ((3, 0, 0), (4, 0, 0))
TESTED = ((3, 0, 0), (3, 1, 0))

# The DUL state after it has written an A-ASSOCIATE-RJ and waits for the peer to close (AE-8).
STATE_REJECT_SENT = "Sta13"


class UnsupportedPynetdicom(RuntimeError):
    """The installed pynetdicom is outside the range this module was written for."""


def parse_version(text: str) -> tuple[int, int, int]:
    parts: list[int] = []
    for piece in text.split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


def _fmt(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


def check_version(version: str = pynetdicom.__version__) -> None:
    """Raise UnsupportedPynetdicom outside SUPPORTED; warn outside TESTED."""
    v = parse_version(version)
    lo, hi = SUPPORTED
    if not lo <= v < hi:
        raise UnsupportedPynetdicom(
            f"pynetdicom {version} is not supported: triage_agent.pynetdicom_compat uses private "
            f"pynetdicom internals written for >={_fmt(lo)},<{_fmt(hi)}; "
            f"install a version in that range")
    lo, hi = TESTED
    if not lo <= v < hi:
        warnings.warn(
            f"pynetdicom {version} is outside the tested range >={_fmt(lo)},<{_fmt(hi)}; run "
            f"tests/test_pynetdicom_compat.py to check the private internals the receiver uses",
            RuntimeWarning, stacklevel=2)


check_version()


def hide_identifiers_in_logs() -> None:
    """Never let pynetdicom log identifiers from requests/responses (patient names, IDs)."""
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False


# -- bounded PDU read -------------------------------------------------------------------------

_original_recv = AssociationSocket.recv


def _bounded_recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """Refuse to read a PDU longer than we allow: stock pynetdicom reads whatever 32-bit length
    the peer declares. Raising OSError makes the DUL treat it as a closed connection."""
    cap = getattr(self, "triage_max_read", None)
    if cap is not None and nr_bytes > cap:
        raise OSError(f"peer declared a {nr_bytes}-byte PDU; limit is {cap}")
    return _original_recv(self, nr_bytes)


def install_bounded_recv() -> None:
    """Make ``AssociationSocket.recv`` honour a per-socket cap (see set_read_cap). Idempotent;
    a socket without a cap reads as before."""
    AssociationSocket.recv = _bounded_recv  # type: ignore[method-assign]


def set_read_cap(assoc: Any, cap: int) -> None:
    """Cap the PDU length this association's socket will read."""
    sock = assoc.dul.socket
    if sock is not None:
        sock.triage_max_read = cap


# -- servers built with AE.make_server ---------------------------------------------------------

def register_server(ae: AE, server: Any) -> None:
    """Record a server built with ``ae.make_server`` as the AE's own (what ``start_server``
    does): ``server.shutdown()`` removes it from that list and fails if it is absent, and
    ``ae.shutdown()`` stops the servers listed there."""
    ae._servers.append(server)


def forget_server(ae: AE, server: Any) -> None:
    """Drop a server from the AE's list if its shutdown has not already done so."""
    if server in ae._servers:
        ae._servers.remove(server)


# -- ending associations -----------------------------------------------------------------------

def shutdown_socket(assoc: Any) -> None:
    """Shut the association's TCP socket down both ways: a DUL thread blocked in recv() on a
    slow-drip peer only notices a closed socket."""
    try:
        sock = assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def hard_kill(assoc: Any) -> None:
    """Stop an association's threads without waiting for them (``Association.kill`` waits for
    the DUL, which may be stuck on its ARTIM timer after a protocol error)."""
    assoc.dul.kill_dul()
    assoc._kill = True
    assoc.is_established = False
    assoc._reactor_checkpoint.set()
    # An acceptor still waiting for its A-ASSOCIATE-RQ blocks on this queue for acse_timeout;
    # None is what a timeout returns, and makes it give up now.
    assoc.dul.to_user_queue.put(None)


def send_reject(assoc: Any, result: int, source: int, diagnostic: int) -> None:
    """Queue an A-ASSOCIATE-RJ from an EVT_REQUESTED handler."""
    assoc.acse.send_reject(result, source, diagnostic)


def wait_reject_sent(assoc: Any, timeout_s: float = 2.0) -> None:
    """Wait (bounded) until the DUL thread has written the A-ASSOCIATE-RJ.

    pynetdicom only queues the rejection for its DUL thread, and shuts the socket as soon as the
    EVT_REQUESTED handlers return; when the shutdown wins, the modality sees a bare close
    ("peer aborted association") instead of the reason."""
    dul = assoc.dul
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if dul.state_machine.current_state == STATE_REJECT_SENT or not dul.is_alive():
            return
        time.sleep(0.002)
