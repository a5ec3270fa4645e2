"""Every use of pynetdicom's private internals, in one place.

The receiver needs a few things pynetdicom has no public API for: a bounded PDU read, a hard
stop for an association an abort did not end, registering a server it built itself with the AE,
keeping identifiers out of pynetdicom's own log, and association threads that wait for events
instead of polling every millisecond. Each lives here, so a pynetdicom upgrade has one module to
review. ``tests/test_pynetdicom_compat.py`` asserts that every private attribute used below still
exists and that the loops copied here still match pynetdicom's, and fails loudly when not.

Importing the module checks the installed version: outside ``SUPPORTED`` it raises, outside
``TESTED`` (but supported) it warns.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import queue
import select
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, cast

import pynetdicom
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
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
# SHA-256 of the source of AssociationSocket.recv, whose behaviour _bounded_recv keeps (read
# until nr_bytes or the peer closes; return what was read) while reading in larger pieces.
RECV_SOURCE = "6bc20a33b1b7cfe76d4ad4407ca242563bc6206fde4b4e1cf7a2fbb1f11d621d"
# pynetdicom reads 4096 bytes per call: a 512 KB slice takes 128 system calls, each giving the
# GIL away and most waking the thread again. Here one call waits for up to this much
# (MSG_WAITALL; TLS sockets take no flags and return a record at a time).
RECV_CHUNK = 256 * 1024
_WAITALL = getattr(socket, "MSG_WAITALL", 0)


def _bounded_recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv``, refusing a PDU longer than we allow: stock pynetdicom reads
    whatever 32-bit length the peer declares. Raising OSError makes the DUL treat it as a closed
    connection. The buffer grows as data arrives, so a declared length costs no memory."""
    cap = getattr(self, "triage_max_read", None)
    if cap is not None and nr_bytes > cap:
        raise OSError(f"peer declared a {nr_bytes}-byte PDU; limit is {cap}")
    sock = cast(socket.socket, self.socket)
    flags = 0 if isinstance(sock, ssl.SSLSocket) else _WAITALL
    bytestream = bytearray()
    while len(bytestream) < nr_bytes:
        data = sock.recv(min(nr_bytes - len(bytestream), RECV_CHUNK), flags)
        if not data:  # the peer closed: return what we have (the DUL then sees a short PDU)
            return bytestream
        bytestream += data
    return bytestream


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


# -- sending -----------------------------------------------------------------------------------

def set_nodelay(assoc: Any) -> bool:
    """Send each PDU as soon as it is written (TCP_NODELAY) on an association the node opened.
    pynetdicom writes a C-STORE as a command PDU and data PDUs; with Nagle's algorithm on, the
    last piece waits for the peer's delayed ACK (about 40 ms an object). DCMTK's tools do the same
    with ``TCP_NODELAY=1``. False when the association has no TCP socket (closed already)."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return False
    return True


def keep_responses_for_the_caller(assoc: Any) -> None:
    """Stop a requestor's reactor thread from taking the response a ``send_*`` call waits for.

    ``send_c_store`` (and the other ``send_*`` methods) pause the reactor by clearing
    ``_reactor_checkpoint`` and waiting until ``_is_paused`` is true; but that flag is still true
    from the previous call while the reactor thread, released by it, has not yet run. The
    reactor can then look at the DIMSE queue once more, take the peer's response and drop it
    ("Received unexpected C-STORE service message"); the caller waits out ``dimse_timeout`` and
    the object counts as failed though the peer stored it. A fast peer on a loaded CPU makes
    that likely. Here a response that reaches ``_serve_request`` while a ``send_*`` call is in
    progress (checkpoint cleared) goes back to the head of the queue for that call; one that
    arrives with no call waiting is dropped as before."""
    serve = assoc._serve_request
    msg_queue = assoc.dimse.msg_queue

    def serve_request(msg: Any, context_id: int) -> None:
        if (not assoc._reactor_checkpoint.is_set() and not assoc._sent_release
                and not msg.is_valid_request and msg.is_valid_response):
            with msg_queue.mutex:
                msg_queue.queue.appendleft((context_id, msg))
                msg_queue.unfinished_tasks += 1
                msg_queue.not_empty.notify()
            return
        serve(msg, context_id)

    assoc._serve_request = serve_request


def prepare_requestor(assoc: Any) -> None:
    """What every association the node opens (delivery, retrieval) gets once it is established:
    ``set_nodelay`` and ``keep_responses_for_the_caller``."""
    set_nodelay(assoc)
    keep_responses_for_the_caller(assoc)


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


# -- event-driven association threads ----------------------------------------------------------
#
# Stock pynetdicom polls: the DUL thread sleeps 1 ms whenever a loop found nothing to do, and
# the association thread sleeps 1 ms before every look at its DIMSE queue. Each C-STORE waits on
# those sleeps between its last PDU, its handler and its response, and every open association,
# idle or not, wakes two threads a thousand times a second to compete for the GIL. The loops below are
# pynetdicom's own (REACTOR_SOURCES pins the code they copy) with each sleep replaced by a wait
# that ends as soon as there is something to do: the DUL thread blocks in select() on its socket
# and on a wake-up socket that other threads write to when they queue work for it or set its kill
# flag; the association thread blocks on an Event set when a DIMSE message, an A-RELEASE or an
# A-ABORT reaches its queues, when its kill flag is set or when the DUL thread ends. No wait is
# longer than WAIT_CAP_S (nor than the ARTIM timer's remaining time), so anything nobody signals
# (the network idle timer, a thread that died) is still seen.

WAIT_CAP_S = 0.05
# While an association is busy (a PDU within the last BUSY_S, or a request being served) both
# threads also wake every BUSY_WAIT_S, as pynetdicom's loops do. On a CPU shared with busy
# processes a thread woken by its fsync's completion otherwise waits for the running task's time
# slice to end; a thread that wakes every millisecond gives the scheduler that point sooner (2
# vCPU at load 9: the C-STORE handler's median 13 ms with pynetdicom's polling, 18-22 ms with
# event waits alone). An idle association's threads wake at most every WAIT_CAP_S.
BUSY_WAIT_S = 0.001
BUSY_S = 0.1
# SHA-256 of the source of each pynetdicom loop copied below, as TESTED: when pynetdicom's code
# differs, associations keep its own polling loops (and the compat test fails).
REACTOR_SOURCES = {
    "DULServiceProvider.run_reactor":
        "e3a10eb3a0931e4854af33b9496e92d9679522aca26b0e04da8967559b9e2803",
    "Association._run_reactor":
        "f28838c5559e462a563750cfc9f3790027f4bb7e2223baf42c9f5d682c359dee",
}

log = logging.getLogger(__name__)
_DUL_LOG = logging.getLogger("pynetdicom.dul")
_ASSOC_LOG = logging.getLogger("pynetdicom.association")


def source_digest(fn: Callable[..., Any]) -> str | None:
    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()
    except (OSError, TypeError):
        return None


@functools.cache
def reactors_replaceable() -> bool:
    """True when pynetdicom's loops are the ones copied here and nothing else runs them (the DUL
    thread runs ``run_reactor`` through ``Thread.run``; no context variables to carry)."""
    same = (source_digest(DULServiceProvider.run_reactor)
            == REACTOR_SOURCES["DULServiceProvider.run_reactor"]
            and source_digest(Association._run_reactor)
            == REACTOR_SOURCES["Association._run_reactor"])
    ok = same and "run" not in vars(DULServiceProvider) and not pynetdicom_config.PASS_CONTEXTVARS
    if not ok:
        log.warning("pynetdicom %s: its association loops differ from those "
                    "triage_agent.pynetdicom_compat replaces; keeping its 1 ms polling",
                    pynetdicom.__version__)
    return ok


class _Wakeup:
    """Ends the DUL thread's select() from another thread (a byte on a socket pair)."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.owner: int | None = None  # the DUL thread, once it runs
        # close() waits for a set() in progress: a descriptor closed under a send could be
        # reused by another connection before the send reaches it.
        self._lock = threading.Lock()
        self._closed = False

    def set(self) -> None:
        if threading.get_ident() == self.owner:
            return  # the DUL thread looks at its queues and flags before it waits again
        with self._lock:
            if self._closed:
                return
            # OSError: full (a byte is already waiting, so the select ends anyway)
            with contextlib.suppress(OSError):
                self.writer.send(b"\0")

    def drain(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.reader.close()
            self.writer.close()


class EventDrivenDUL(DULServiceProvider):
    """An acceptor's DUL after ``use_event_driven_reactors``: ``_kill_thread`` wakes the loop."""

    triage_wakeup: _Wakeup

    @property  # type: ignore[override]
    def _kill_thread(self) -> bool:
        return bool(self.__dict__.get("triage_kill_thread", False))

    @_kill_thread.setter
    def _kill_thread(self, value: bool) -> None:
        self.__dict__["triage_kill_thread"] = value
        self.triage_wakeup.set()

    def run(self) -> None:
        self.triage_wakeup.owner = threading.get_ident()
        try:
            _dul_reactor(self)
        finally:
            self.triage_wakeup.close()
            self.assoc.triage_wake.set()  # type: ignore[attr-defined]


class EventDrivenAssociation(Association):
    """An acceptor association after ``use_event_driven_reactors``: ``_kill`` wakes the loop."""

    triage_wake: threading.Event

    @property  # type: ignore[override]
    def _kill(self) -> bool:
        return bool(self.__dict__.get("triage_kill", False))

    @_kill.setter
    def _kill(self, value: bool) -> None:
        self.__dict__["triage_kill"] = value
        self.triage_wake.set()

    def _run_reactor(self) -> None:
        _association_reactor(self)


def _wake_on_put(q: queue.Queue[Any], wake: Callable[[], None]) -> None:
    put = q.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        wake()

    q.put = put_and_wake  # type: ignore[method-assign]


def use_event_driven_reactors(assoc: Any) -> bool:
    """Make an acceptor association wait for events instead of polling (call from EVT_CONN_OPEN,
    before its threads start). False, and pynetdicom's own loops, when pynetdicom's code is not
    the one copied here or the association is not a fresh stock acceptor."""
    if not _fresh_stock_acceptor(assoc) or not reactors_replaceable():
        return False
    dul = assoc.dul
    wakeup, wake = _Wakeup(), threading.Event()
    kill_thread, kill = dul.__dict__.pop("_kill_thread"), assoc.__dict__.pop("_kill")
    dul.triage_wakeup, assoc.triage_wake = wakeup, wake
    assoc.triage_serving, assoc.triage_busy_until = False, 0.0
    dul.__class__, assoc.__class__ = EventDrivenDUL, EventDrivenAssociation
    dul.__dict__["triage_kill_thread"], assoc.__dict__["triage_kill"] = kill_thread, kill
    _wake_on_put(dul.to_provider_queue, wakeup.set)
    _wake_on_put(dul.event_queue, wakeup.set)
    _wake_on_put(dul.to_user_queue, wake.set)
    _wake_on_put(assoc.dimse.msg_queue, wake.set)
    return True


def _fresh_stock_acceptor(assoc: Any) -> bool:
    return (type(assoc) is Association and type(assoc.dul) is DULServiceProvider
            and assoc.is_acceptor and not assoc.is_alive() and not assoc.dul.is_alive())


def _wait_cap(assoc: Any) -> float:
    busy = assoc.triage_serving or time.monotonic() < assoc.triage_busy_until
    return BUSY_WAIT_S if busy else WAIT_CAP_S


def _dul_wait(dul: Any) -> None:
    """Until the socket has data, another thread queued work or set a flag, the ARTIM timer is
    due, or WAIT_CAP_S passed. Replaces ``time.sleep(self._run_loop_delay)``."""
    if dul.event_queue.qsize() or dul.to_provider_queue.qsize():
        return
    timeout = _wait_cap(dul.assoc)
    left = dul.artim_timer.remaining
    if 0 < left < timeout:
        timeout = left
    wakeup = dul.triage_wakeup
    waitable = [wakeup.reader]
    sock = dul.socket.socket if dul.socket is not None else None
    if sock is not None:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes select() cannot see
        waitable.append(sock)
    try:
        select.select(waitable, [], [], timeout)
    except (OSError, ValueError):  # the socket was closed under us: poll as pynetdicom does
        time.sleep(dul._run_loop_delay)
    wakeup.drain()


def _dul_reactor(dul: Any) -> None:
    """``DULServiceProvider.run_reactor`` with its sleep replaced by ``_dul_wait``."""
    dul._idle_timer.start()
    sleep = False
    while True:
        if not dul.assoc._dul_ready.is_set():
            dul.assoc._dul_ready.set()
            sleep = True
        if sleep:
            _dul_wait(dul)
        if dul._kill_thread:
            break
        if dul.artim_timer.expired:
            dul.event_queue.put("Evt18")
        try:
            if dul._process_recv_primitive():
                pass
            elif dul._is_transport_event():
                dul._idle_timer.restart()
                dul.assoc.triage_busy_until = time.monotonic() + BUSY_S
        except Exception as exc:
            _DUL_LOG.error("Exception in DUL.run(), aborting association")
            _DUL_LOG.exception(exc)
            # Bypass the state machine and send an A-ABORT (as pynetdicom does)
            abort_pdu = A_ABORT_RQ()
            abort_pdu.source = 0x02
            abort_pdu.reason_diagnostic = 0x00
            dul.socket.send(abort_pdu.encode())
            dul.assoc.is_aborted = True
            dul.assoc.is_established = False
            dul.assoc._kill = True
            dul._kill_thread = True
            return
        try:
            event = dul.event_queue.get(block=False)
        except queue.Empty:
            sleep = True
            continue
        dul.state_machine.do_action(event)
        sleep = False


def _association_reactor(assoc: Any) -> None:
    """``Association._run_reactor`` with its sleep replaced by a wait on ``triage_wake`` (set
    by every put on the DIMSE message queue and the DUL's to-user queue, by ``_kill`` and when
    the DUL thread ends), and only when the last loop found no message."""
    wake = assoc.triage_wake
    assoc._is_paused = False
    idle = False
    while not assoc._kill:
        if idle:
            wake.wait(_wait_cap(assoc))
        wake.clear()  # before looking: whatever arrives from here on sets it again

        assoc._is_paused = True
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False

        context_id, msg = assoc.dimse.get_msg(block=False)
        idle = not msg
        if msg:
            assoc.triage_serving = True
            try:
                assoc._serve_request(msg, context_id)
            finally:
                assoc.triage_serving = False
                assoc.triage_busy_until = time.monotonic() + BUSY_S

        # Check for release request from the peer
        if assoc.is_established and assoc.acse.is_release_requested():
            assoc.acse.send_release(is_response=True)
            _ASSOC_LOG.info("Association Released")
            assoc.is_released = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_RELEASED, {})
            assoc.kill()
            return

        # Check for abort from either locally or the peer
        if assoc.acse.is_aborted():
            log_msg = "Association Aborted"
            if assoc.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            _ASSOC_LOG.info(log_msg)
            # Ensure that EVT_ASCE_RECV fires for subscribers
            assoc.dul.receive_pdu(wait=False)
            assoc.is_aborted = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            assoc.kill()
            return

        # Check if the DULServiceProvider thread is still running
        if not assoc.dul.is_alive():
            assoc.kill()
            return

        # Check if network_timeout has expired
        if assoc.dul.idle_timer_expired():
            _ASSOC_LOG.error("Network timeout reached")
            if assoc.network_timeout_response == "A-RELEASE":
                assoc._is_paused = True
                assoc._reactor_checkpoint.wait()
                assoc.release()
                assoc._is_paused = False
            else:
                assoc.abort()

            assoc.kill()
            return
