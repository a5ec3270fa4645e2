"""DICOM TLS with client certificates, both ways, against real DCMTK peers (issue 6).

SCP: the node as TLS server with ``require_client_certificate``; DCMTK ``echoscu``/``storescu``
as modalities. Only a client certificate from the configured CA gets an association; anonymous
TLS, a certificate from another CA, a self-signed one and plain TCP are refused, nothing is
stored and the node keeps serving.

SCU: ``send_files`` towards DCMTK ``storescp +tls ... --require-peer-cert``. Only our certificate
from the PACS's CA, with the PACS's certificate checked against our CA and its name, delivers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from tests.conftest import Node, files_under, require_tool, storescu, write_config
from tests.factories import make_series
from tests.peers import free_port
from tests.tls_util import PKI, KeyPair, dcmtk_tls_args, make_pki, security_section
from triage_agent.config import DestinationConfig, DestinationTLS
from triage_agent.models import Instance
from triage_agent.sender import DELIVERED, PERMANENT, TRANSIENT, send_files

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_series(tmp_path_factory.mktemp("ct"), n=2, seed=606, size=32)


FAST_NODE = {"max_associations": 50, "acse_timeout_s": 5}


def node_tls(pki: PKI, ca: Path | None = None, require: bool = True) -> dict[str, object]:
    return security_section({
        "certificate": str(pki.server.cert), "private_key": str(pki.server.key),
        "ca_certificate": str(ca or pki.ca1.cert), "require_client_certificate": require,
    })


@pytest.fixture(scope="module")
def tls_node(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One TLS node for the SCP tests (TLS is independent of the database backend: SQLite).

    Every refused handshake currently holds an association slot until the ACSE timeout
    (test_scp_failed_handshakes_do_not_hold_association_slots): room and a short timeout here
    keep the other tests independent of that bug and the shutdown quick.
    """
    work = tmp_path_factory.mktemp("tlsnode")
    node = Node(work / "node", f"sqlite:///{work / 'triage.db'}", security=node_tls(pki),
                node=FAST_NODE)
    node.start()
    wait_tls_echo(node.port, pki)
    yield node
    node.stop(10)


def echo_args(port: int, tls: list[str], *, called: str = "TRIAGE",
              timeout_s: int = 5) -> subprocess.CompletedProcess[str]:
    """DCMTK echoscu with the given TLS options ([] = plain TCP)."""
    exe = require_tool("echoscu", "dcmtk")
    t = str(timeout_s)
    return subprocess.run([exe, "-to", t, "-ta", t, "-td", t, "-aec", called, "-aet", "MODALITY",
                           *tls, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=timeout_s * 2 + 3)


def echo(port: int, pki: PKI, client: KeyPair | None) -> subprocess.CompletedProcess[str]:
    return echo_args(port, dcmtk_tls_args(pki, client))


def wait_tls_echo(port: int, pki: PKI, timeout_s: float = 30) -> None:
    """``tests.peers.wait_echo`` over TLS with the trusted client certificate."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = echo(port, pki, pki.client)
        if last.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"no TLS C-ECHO answer on port {port}: {last and last.stderr}")


def stored(node: Node) -> set[Path]:
    return set(files_under(node.storage_root))


# ----------------------------------------------------------------------------- SCP side


def test_scp_trusted_client_echoes_and_stores(tls_node: Node, pki: PKI,
                                              series: list[Path]) -> None:
    r = echo(tls_node.port, pki, pki.client)
    assert r.returncode == 0, r.stderr
    before = stored(tls_node)
    r = storescu(tls_node.port, series, extra=dcmtk_tls_args(pki, pki.client))
    assert r.returncode == 0, r.stderr
    assert len(stored(tls_node) - before) == len(series)
    # Recorded, not only written.
    uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in series}
    with tls_node.session()() as s:
        got = set(s.scalars(select(Instance.sop_instance_uid)
                            .where(Instance.sop_instance_uid.in_(uids))))
    assert got == uids


REFUSED = {
    "anonymous-tls": lambda pki: dcmtk_tls_args(pki, None),
    "client-cert-from-other-ca": lambda pki: dcmtk_tls_args(pki, pki.client_ca2),
    "self-signed-client-cert": lambda pki: dcmtk_tls_args(pki, pki.client_self),
    "plain-tcp": lambda pki: [],
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_scp_refuses_untrusted_clients(tls_node: Node, pki: PKI, series: list[Path],
                                       case: str) -> None:
    before = stored(tls_node)
    args = REFUSED[case](pki)
    r = echo_args(tls_node.port, args)
    assert r.returncode != 0, f"{case}: C-ECHO was answered\n{r.stdout}{r.stderr}"
    r = storescu(tls_node.port, series, extra=["-to", "5", "-ta", "5", "-td", "5", *args])
    assert r.returncode != 0, f"{case}: storescu succeeded\n{r.stdout}{r.stderr}"
    assert stored(tls_node) == before, f"{case}: something was stored"
    # The node is still alive and still serves trusted modalities.
    assert tls_node.proc is not None and tls_node.proc.poll() is None
    ok = echo(tls_node.port, pki, pki.client)
    assert ok.returncode == 0, f"after {case}: trusted echo failed\n{ok.stderr}"


def test_scp_silent_tcp_connection_does_not_block_the_listener(tls_node: Node, pki: PKI) -> None:
    """Stock pynetdicom handshakes in the accept loop: one silent socket stalled every sender."""
    silent = socket.create_connection(("127.0.0.1", tls_node.port), timeout=5)
    try:
        time.sleep(0.3)  # let the listener accept it and start waiting for the ClientHello
        try:
            answered = echo_args(tls_node.port, dcmtk_tls_args(pki, pki.client),
                                 timeout_s=2).returncode == 0
        except subprocess.TimeoutExpired:
            answered = False
        assert answered, "a trusted modality could not associate while one socket sat silent"
    finally:
        silent.close()
        wait_tls_echo(tls_node.port, pki)  # the listener recovers once the socket goes


def test_scp_logs_refused_tls_handshake(tls_node: Node, pki: PKI) -> None:
    size = tls_node.log_path.stat().st_size
    r = echo(tls_node.port, pki, pki.client_ca2)
    assert r.returncode != 0
    deadline = time.monotonic() + 3
    new = ""
    while time.monotonic() < deadline:
        with open(tls_node.log_path) as f:
            f.seek(size)
            new = f.read().lower()
        if "tls" in new or "certificate" in new:
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing about the refused handshake in the log:\n{new}")


def test_scp_audits_refused_tls_handshake(tls_node: Node, pki: PKI) -> None:
    from triage_agent.models import Event

    with tls_node.session()() as s:
        last = s.scalar(select(Event.id).order_by(Event.id.desc()).limit(1)) or 0
    assert echo(tls_node.port, pki, pki.client_self).returncode != 0
    deadline = time.monotonic() + 2
    found: list[str] = []
    while time.monotonic() < deadline and not found:
        with tls_node.session()() as s:
            found = [f"{e.kind} {e.detail}" for e in s.scalars(
                select(Event).where(Event.id > last, Event.source_address == "127.0.0.1",
                                    Event.flagged.is_(True)))]
        time.sleep(0.2)
    assert any(w in f.lower() for f in found for w in ("tls", "certificate", "handshake")), found


def test_scp_failed_handshakes_do_not_hold_association_slots(pki: PKI, tmp_path: Path) -> None:
    node = Node(tmp_path / "node", f"sqlite:///{tmp_path / 'triage.db'}", security=node_tls(pki),
                node={"max_associations": 2})
    node.start()
    try:
        wait_tls_echo(node.port, pki)
        for client in (None, pki.client_ca2, pki.client_self):
            assert echo(node.port, pki, client).returncode != 0
        r = echo(node.port, pki, pki.client)
        assert r.returncode == 0, f"trusted modality locked out:\n{r.stderr}"
    finally:
        node.kill()  # SIGTERM would wait out the same ACSE timeout


def test_scp_reload_applies_new_client_ca(pki: PKI, tmp_path: Path) -> None:
    node = Node(tmp_path / "node", f"sqlite:///{tmp_path / 'triage.db'}", security=node_tls(pki),
                node=FAST_NODE)
    node.start()
    try:
        wait_tls_echo(node.port, pki)
        # Trust CA2 instead of CA1: the CA1 client must now be refused, the CA2 one accepted.
        node.sections["security"] = node_tls(pki, ca=pki.ca2.cert)
        write_config(node.config, node.sections)
        size = node.log_path.stat().st_size
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload:" not in node.log_path.read_text()[size:] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "applied" in node.log_path.read_text()[size:]
        assert echo(node.port, pki, pki.client_ca2).returncode == 0
        assert echo(node.port, pki, pki.client).returncode != 0
    finally:
        node.kill()  # shutdown is not under test here


# ----------------------------------------------------------------------------- SCU side


class TLSStoreSCP:
    """DCMTK storescp with TLS, demanding a client certificate from CA1."""

    def __init__(self, out: Path, server: KeyPair, ca: Path) -> None:
        exe = require_tool("storescp", "dcmtk")
        self.port = free_port()
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.log = out.parent / f"{out.name}.log"
        self.proc = subprocess.Popen(
            [exe, "-aet", "PACS", "-od", str(out), "+tls", str(server.key), str(server.cert),
             "+cf", str(ca), "--require-peer-cert", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"),  # noqa: SIM115
            env={**os.environ, "TCP_NODELAY": "1"},
        )

    def wait(self, pki: PKI) -> TLSStoreSCP:
        wait_tls_echo_aet(self.port, pki)
        return self

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def received(self) -> list[Path]:
        return [p for p in self.out.iterdir() if p.is_file()]

    def dest(self, tls: DestinationTLS | None) -> DestinationConfig:
        return DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=self.port,
                                 tls=tls)


def wait_tls_echo_aet(port: int, pki: PKI, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if echo_args(port, dcmtk_tls_args(pki, pki.client), called="PACS",
                     timeout_s=2).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"TLS storescp on port {port} never answered C-ECHO")


@pytest.fixture(scope="module")
def tls_pacs(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSStoreSCP]:
    scp = TLSStoreSCP(tmp_path_factory.mktemp("pacs") / "in", pki.server, pki.ca1.cert)
    scp.wait(pki)
    yield scp
    scp.stop()


def _tls(pki: PKI, client: KeyPair | None, ca: Path) -> DestinationTLS:
    return DestinationTLS(certificate=client.cert if client else None,
                          private_key=client.key if client else None, ca_certificate=ca)


def test_scu_trusted_delivers(tls_pacs: TLSStoreSCP, pki: PKI, series: list[Path]) -> None:
    before = set(tls_pacs.received())
    outs = send_files(tls_pacs.dest(_tls(pki, pki.client, pki.ca1.cert)), series,
                      calling_ae="TRIAGE", timeout_s=5)
    assert [o.kind for o in outs] == [DELIVERED] * len(series), outs
    assert len(set(tls_pacs.received()) - before) == len(series)


SCU_REFUSED = {
    # our client certificate is from CA2, which the PACS does not trust
    "client-cert-from-other-ca": lambda pki: _tls(pki, pki.client_ca2, pki.ca1.cert),
    # no client certificate at all, the PACS requires one
    "no-client-cert": lambda pki: _tls(pki, None, pki.ca1.cert),
    # we trust only CA2: the PACS's certificate (CA1) is not trusted by us
    "pacs-cert-not-trusted": lambda pki: _tls(pki, pki.client, pki.ca2.cert),
    # no TLS configured for a TLS-only PACS
    "plain-to-tls-pacs": lambda pki: None,
}


@pytest.mark.parametrize("case", list(SCU_REFUSED))
def test_scu_refused(tls_pacs: TLSStoreSCP, pki: PKI, series: list[Path], case: str) -> None:
    before = set(tls_pacs.received())
    outs = send_files(tls_pacs.dest(SCU_REFUSED[case](pki)), series, calling_ae="TRIAGE",
                      timeout_s=5)
    assert len(outs) == len(series)
    assert all(o.kind in (TRANSIENT, PERMANENT) and o.status is None and o.error for o in outs), outs
    assert set(tls_pacs.received()) == before
    assert tls_pacs.proc.poll() is None


def test_scu_checks_the_pacs_host_name(pki: PKI, series: list[Path], tmp_path: Path) -> None:
    """A certificate from the right CA but for another host is refused (check_hostname)."""
    scp = TLSStoreSCP(tmp_path / "in", pki.server_wrong_name, pki.ca1.cert).wait(pki)
    try:
        outs = send_files(scp.dest(_tls(pki, pki.client, pki.ca1.cert)), series,
                          calling_ae="TRIAGE", timeout_s=5)
        assert all(o.kind != DELIVERED for o in outs), outs
        assert scp.received() == []
    finally:
        scp.stop()


@pytest.mark.parametrize("case", ["client-cert-from-other-ca", "no-client-cert",
                                  "pacs-cert-not-trusted"])
def test_scu_refusal_names_tls(tls_pacs: TLSStoreSCP, pki: PKI, series: list[Path],
                               case: str) -> None:
    outs = send_files(tls_pacs.dest(SCU_REFUSED[case](pki)), series[:1], calling_ae="TRIAGE",
                      timeout_s=5)
    err = (outs[0].error or "").lower()
    assert any(w in err for w in ("tls", "ssl", "handshake", "certificate")), outs[0].error
