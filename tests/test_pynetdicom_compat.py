"""pynetdicom's private internals the receiver relies on (triage_agent/pynetdicom_compat.py).

These fail loudly, naming the attribute, when a pynetdicom upgrade renames or removes one; the
receiver would otherwise fail only under attack (an oversized PDU) or a stuck association.
"""

from __future__ import annotations

import inspect
import queue
import socketserver
import threading
import warnings

import pynetdicom
import pytest
from pynetdicom import AE, _config
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import ACTIONS, TRANSITION_TABLE, StateMachine
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

    class FakeSocket:
        triage_max_read = 10

    with pytest.raises(OSError, match="11-byte PDU; limit is 10"):
        compat._bounded_recv(FakeSocket(), 11)  # type: ignore[arg-type]


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
