"""pynetdicom's private internals the receiver relies on (triage_agent/pynetdicom_compat.py).

These fail loudly, naming the attribute, when a pynetdicom upgrade renames or removes one; the
receiver would otherwise fail only under attack (an oversized PDU) or a stuck association. The
event-driven association loops are checked against pynetdicom's source and by what a sender sees:
every C-STORE answered, silent peers and aborts still ended, idle associations not polling.
"""

from __future__ import annotations

import inspect
import queue
import socket
import socketserver
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import ACTIONS, TRANSITION_TABLE, StateMachine
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationServer, AssociationSocket, ThreadedAssociationServer

from triage_agent import pynetdicom_compat as compat
from triage_agent import receiver


def test_installed_version_is_supported_and_tested() -> None:
    v = compat.parse_version(pynetdicom.__version__)
    assert compat.SUPPORTED[0] <= v < compat.SUPPORTED[1], (
        f"pynetdicom {pynetdicom.__version__} outside {compat.SUPPORTED}")
    assert compat.TESTED[0] <= v < compat.TESTED[1], (
        f"pynetdicom {pynetdicom.__version__} outside the tested range {compat.TESTED}: review "
        f"triage_agent/pynetdicom_compat.py against it, then widen TESTED")


def test_version_check_raises_outside_supported_and_warns_outside_tested() -> None:
    with pytest.raises(compat.UnsupportedPynetdicom, match="pynetdicom 4.0.0 is not supported"):
        compat.check_version("4.0.0")
    with pytest.raises(compat.UnsupportedPynetdicom):
        compat.check_version("2.1.1")
    with pytest.warns(RuntimeWarning, match="outside the tested range"):
        compat.check_version("3.1.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_version("3.0.4")
    assert compat.parse_version("3.1.0.dev0") == (3, 1, 0)
    assert compat.parse_version("3") == (3, 0, 0)


def test_log_switches_exist_and_are_off_once_the_receiver_is_imported() -> None:
    for name in ("LOG_REQUEST_IDENTIFIERS", "LOG_RESPONSE_IDENTIFIERS"):
        assert hasattr(_config, name), f"pynetdicom._config.{name} is gone"
        assert getattr(_config, name) is False, f"pynetdicom._config.{name} is on"


def test_socket_recv_keeps_its_signature_and_is_bounded() -> None:
    params = list(inspect.signature(compat._original_recv).parameters)
    assert params == ["self", "nr_bytes"], f"AssociationSocket.recv is now recv({params})"
    assert AssociationSocket.recv is compat._bounded_recv, "the bounded recv is not installed"

    assert compat.source_digest(compat._original_recv) == compat.RECV_SOURCE, (
        "AssociationSocket.recv changed: check that _bounded_recv still behaves like it, then "
        "update RECV_SOURCE")

    class FakeSocket:
        triage_max_read = 10

    with pytest.raises(OSError, match="11-byte PDU; limit is 10"):
        compat._bounded_recv(FakeSocket(), 11)  # type: ignore[arg-type]


def test_socket_recv_reads_exactly_what_was_asked_or_what_came_before_a_close() -> None:
    ours, peer = socket.socketpair()

    class Wrapped:
        triage_max_read = 1 << 24
        socket = ours

    payload = bytes(range(256)) * 4000  # about 1 MB: several reads
    sender = threading.Thread(target=lambda: peer.sendall(payload + b"next"))
    sender.start()
    got = compat._bounded_recv(Wrapped(), len(payload))  # type: ignore[arg-type]
    sender.join(5)
    assert isinstance(got, bytearray) and got == payload
    assert compat._bounded_recv(Wrapped(), 4) == b"next"  # type: ignore[arg-type]
    peer.sendall(b"short")
    peer.close()
    assert compat._bounded_recv(Wrapped(), 100) == b"short"  # type: ignore[arg-type]
    ours.close()


def test_ae_keeps_its_server_list_and_server_shutdown_uses_it() -> None:
    ae = AE()
    assert isinstance(ae._servers, list), "AE._servers is gone"
    # server.shutdown() removes itself from ae._servers: register_server is what keeps it valid.
    assert "_servers.remove" in inspect.getsource(AssociationServer.shutdown)
    server = object()
    compat.register_server(ae, server)
    assert server in ae._servers
    compat.forget_server(ae, server)
    compat.forget_server(ae, server)  # a server its own shutdown removed
    assert server not in ae._servers


def test_association_internals_used_by_hard_kill() -> None:
    assoc = Association(AE(), "acceptor")
    assert assoc._kill is False, "Association._kill is gone"
    assert isinstance(assoc._reactor_checkpoint, threading.Event), (
        "Association._reactor_checkpoint is gone")
    assert "while not self._kill" in inspect.getsource(Association._run_reactor), (
        "the association reactor no longer stops on _kill")
    dul = assoc.dul
    assert isinstance(dul, DULServiceProvider)
    assert isinstance(dul.to_user_queue, queue.Queue), "DULServiceProvider.to_user_queue is gone"
    assert callable(dul.kill_dul)
    assert hasattr(dul, "socket") and dul.socket is None
    assert isinstance(dul.state_machine, StateMachine)
    assert isinstance(assoc.acse, ACSE)
    assert list(inspect.signature(ACSE.send_reject).parameters) == [
        "self", "result", "source", "diagnostic"]

    compat.hard_kill(assoc)
    assert assoc._kill is True and assoc.is_established is False
    assert assoc._reactor_checkpoint.is_set()
    assert dul.to_user_queue.get_nowait() is None


def test_reject_sent_state_is_where_the_dul_waits_after_sending_a_rejection() -> None:
    # Evt8 (the local user rejects) runs AE-8, which sends the A-ASSOCIATE-RJ and enters Sta13.
    assert TRANSITION_TABLE[("Evt8", "Sta3")] == "AE-8"
    assert ACTIONS["AE-8"][2] == compat.STATE_REJECT_SENT, ACTIONS["AE-8"]


def test_hardened_server_overrides_socketserver_methods_pynetdicom_still_calls() -> None:
    for name in ("get_request", "verify_request", "process_request_thread", "shutdown_request"):
        assert hasattr(socketserver.ThreadingTCPServer, name), name
        assert hasattr(ThreadedAssociationServer, name), name
    assert isinstance(ThreadedAssociationServer.ssl_context, property)
    assert "server_class" in inspect.signature(AE.make_server).parameters
    assert issubclass(receiver.HardenedServer, ThreadedAssociationServer)


def test_admission_relies_on_the_server_and_acse_behaving_as_it_assumes() -> None:
    """triage_agent/admission.py: a False verify_request ends in shutdown_request (the explicit
    close of a saturated listener); pynetdicom's own association limit counts every acceptor
    thread and answers (2, 3, 2), the rejection admission sends too, so admission raises that
    limit above its own (association_ceiling) and decides itself."""
    noblock = inspect.getsource(socketserver.BaseServer._handle_request_noblock)
    assert "self.verify_request(request, client_address)" in noblock
    assert "self.shutdown_request(request)" in noblock
    negotiate = inspect.getsource(ACSE._negotiate_as_acceptor)
    assert "self.assoc.ae.maximum_associations" in negotiate
    assert "(0x02, 0x03, 0x02)" in negotiate
    from triage_agent.admission import LOCAL_LIMIT_EXCEEDED
    assert LOCAL_LIMIT_EXCEEDED == (2, 3, 2)


# -- event-driven association threads ----------------------------------------------------------

def test_replaced_loops_are_still_pynetdicoms() -> None:
    """The two loops copied into pynetdicom_compat match the installed pynetdicom's source; the
    flags they react to and the way the DUL thread runs are where the copies expect them."""
    for name, digest in compat.REACTOR_SOURCES.items():
        cls_name, attr = name.split(".")
        cls = {"DULServiceProvider": DULServiceProvider, "Association": Association}[cls_name]
        assert compat.source_digest(getattr(cls, attr)) == digest, (
            f"pynetdicom's {name} changed: compare it with the copy in "
            f"triage_agent/pynetdicom_compat.py, update the copy, then REACTOR_SOURCES")
    assert "run" not in vars(DULServiceProvider), "the DUL thread no longer runs via Thread.run"
    assert "target=make_target(self.run_reactor)" in inspect.getsource(
        DULServiceProvider.__init__)
    assert "self._kill_thread = False" in inspect.getsource(DULServiceProvider.__init__)
    assert "self._kill: bool = False" in inspect.getsource(Association.__init__)
    assert "self._run_reactor()" in inspect.getsource(Association.run_reactor)
    assert "msg_queue.get(" in inspect.getsource(DIMSEServiceProvider.get_msg)
    assert compat.reactors_replaceable()


def _dataset(i: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{i + 1}"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


@dataclass
class Scp:
    port: int
    associations: list[Association]
    stored: list[str]


@pytest.fixture
def scp() -> Iterator[Scp]:
    """A bare pynetdicom acceptor whose associations use the event-driven loops."""
    ae = AE(ae_title="SCP")
    ae.add_supported_context(CTImageStorage, ImplicitVRLittleEndian)
    ae.acse_timeout = 1.0
    ae.network_timeout = 1.0
    out = Scp(0, [], [])

    def on_open(event: Any) -> None:
        assert compat.use_event_driven_reactors(event.assoc)
        out.associations.append(event.assoc)

    def on_store(event: Any) -> int:
        out.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_CONN_OPEN, on_open),
                                           (evt.EVT_C_STORE, on_store)])
    assert server is not None
    out.port = server.server_address[1]
    try:
        yield out
    finally:
        server.shutdown()


def _associate(port: int) -> Association:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="SCP")
    assert assoc.is_established
    # pynetdicom writes a C-STORE as two PDUs: without this, Nagle's algorithm holds the second
    # for the acceptor's delayed ACK (40 ms a store), whichever loops the acceptor runs.
    assert compat.set_nodelay(assoc)
    # As the node's own requestors (sender, retrieval) do: pynetdicom's requestor reactor can
    # otherwise take a fast acceptor's response from under send_c_store.
    compat.keep_responses_for_the_caller(assoc)
    return assoc


def _ended(assoc: Association, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not assoc.is_alive() and not assoc.dul.is_alive():
            return True
        time.sleep(0.01)
    return False


def _wakeups(thread: threading.Thread) -> int:
    """How often the thread has gone to sleep and been woken (Linux)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("voluntary_ctxt_switches")))


def test_every_store_over_one_association_is_answered_and_release_ends_the_threads(
        scp: Scp) -> None:
    assoc = _associate(scp.port)
    try:
        statuses = [assoc.send_c_store(_dataset(i)).Status for i in range(60)]
    finally:
        assoc.release()
    assert statuses == [0x0000] * 60
    assert len(scp.stored) == 60 and len(set(scp.stored)) == 60
    (acceptor,) = scp.associations
    assert isinstance(acceptor, compat.EventDrivenAssociation)
    assert isinstance(acceptor.dul, compat.EventDrivenDUL)
    assert type(assoc) is Association and type(assoc.dul) is DULServiceProvider, (
        "a requestor keeps pynetdicom's own loops")
    assert _ended(acceptor, 1.0), "the acceptor's threads outlived the release"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_an_open_idle_association_does_not_poll(scp: Scp) -> None:
    """pynetdicom's own loops wake each of an association's two threads about 1000 times a
    second while nothing happens; these wait for the peer once it has been quiet for BUSY_S."""
    assoc = _associate(scp.port)
    try:
        assert assoc.send_c_store(_dataset(0)).Status == 0x0000
        (acceptor,) = scp.associations
        time.sleep(compat.BUSY_S + 0.05)
        before = _wakeups(acceptor), _wakeups(acceptor.dul)
        time.sleep(0.5)
        after = _wakeups(acceptor), _wakeups(acceptor.dul)
        assert after[0] - before[0] < 50 and after[1] - before[1] < 50, (before, after)
    finally:
        assoc.release()


def test_a_silent_peer_is_still_closed(scp: Scp) -> None:
    """A connection that never sends an A-ASSOCIATE-RQ (ARTIM timer, acse_timeout 1 s), and an
    association that goes quiet (network_timeout 1 s), are ended as before."""
    with socket.create_connection(("127.0.0.1", scp.port), timeout=5) as raw:
        t0 = time.monotonic()
        assert raw.recv(1) == b""  # closed by the acceptor
        assert time.monotonic() - t0 < 3.0
    assoc = _associate(scp.port)
    (acceptor,) = scp.associations[1:]
    assert _ended(acceptor, 3.0), "an idle association outlived network_timeout"
    assert acceptor.is_aborted
    assert _ended(assoc, 3.0)
    assert assoc.is_aborted


def test_an_abort_ends_the_association_from_either_side(scp: Scp) -> None:
    assoc = _associate(scp.port)
    assoc.abort()
    (acceptor,) = scp.associations
    assert _ended(acceptor, 1.0) and acceptor.is_aborted
    # The node's watchdog: shut the socket down, abort from another thread, kill if need be.
    assoc = _associate(scp.port)
    acceptor = scp.associations[1]
    compat.shutdown_socket(acceptor)
    threading.Thread(target=acceptor.abort, daemon=True).start()
    assert _ended(acceptor, 1.0)
    assert _ended(assoc, 2.0) and not assoc.is_established
    assoc = _associate(scp.port)
    acceptor = scp.associations[2]
    compat.hard_kill(acceptor)
    assert _ended(acceptor, 1.0)
    assoc.abort()


def test_set_nodelay_switches_nagle_off_on_the_requestors_socket(scp: Scp) -> None:
    """The node's own associations (delivery, retrieval) send each PDU at once."""
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="SCP")
    assert assoc.is_established
    sock = assoc.dul.socket.socket  # type: ignore[union-attr]
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0  # pynetdicom's default
    assert compat.set_nodelay(assoc)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assoc.release()
    assert not compat.set_nodelay(assoc), "a released association has no socket to set"


def _store_response(message_id: int) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    rsp.Status = 0x0000
    return rsp


def test_a_response_the_reactor_takes_during_a_send_goes_back_to_the_waiting_call(
        scp: Scp) -> None:
    """The requestor's reactor may look at the DIMSE queue once more just after a send_* call
    began (its pause flag is still set from the previous call); a response it takes then goes
    back to the head of the queue for the call. With no call waiting it is dropped, as before."""
    assoc = _associate(scp.port)
    try:
        assert assoc.send_c_store(_dataset(0)).Status == 0x0000
        first, second = _store_response(7), _store_response(8)
        assoc._reactor_checkpoint.clear()  # what send_* does before sending
        try:
            assoc.dimse.msg_queue.put((1, second))
            assoc._serve_request(first, 1)  # what the reactor does with a message it took
            assert assoc.dimse.get_msg(block=False) == (1, first)
            assert assoc.dimse.get_msg(block=False) == (1, second)
        finally:
            assoc._reactor_checkpoint.set()
        assoc._serve_request(_store_response(9), 1)  # nobody waiting: dropped
        assert assoc.dimse.get_msg(block=False) == (None, None)
        assert assoc.send_c_store(_dataset(1)).Status == 0x0000
    finally:
        assoc.release()


def test_many_stores_on_a_busy_cpu_are_all_answered(scp: Scp) -> None:
    """With pynetdicom's requestor alone, a fast acceptor on a loaded CPU loses a response now
    and then: the store waits out dimse_timeout and the association is aborted (seen within
    300-1130 stores here with three busy processes on two cores)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    assoc = _associate(scp.port)
    assoc.dimse_timeout = 2
    try:
        statuses = [assoc.send_c_store(_dataset(i)).get("Status") for i in range(1200)]
        assert assoc.is_established
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        if assoc.is_established:
            assoc.release()
    assert statuses == [0x0000] * 1200
