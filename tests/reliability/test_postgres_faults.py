"""PostgreSQL faults: a restart, and a network partition between the node and the database,
during ingest and during delivery. Nothing acknowledged is lost, nothing is delivered twice, and
the node recovers by itself (no restart, no operator).

The node reaches PostgreSQL through ``DbLink``, a TCP relay the test controls: ``blackhole``
holds every byte and every new connection (a partition: packets dropped, TCP connections
survive it), ``cut`` resets every connection and refuses new ones (a firewall rejecting, a
failover), ``heal`` lets traffic through again. A restart stops and starts the throw-away
cluster itself.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from tests.conftest import Node, PgServer, PrivateCluster, storescu, wait_for
from tests.factories import make_series
from tests.peers import StoreSCP, TCPListener
from tests.reliability.conftest import FULL, Ledger, reconcile, record, size
from tests.test_model_e2e import tiny_ckpt  # noqa: F401  (module-scoped fixture)
from triage_agent.models import Delivery

pytestmark = [pytest.mark.reliability, pytest.mark.postgres]

PARTITION_S = size(8, 30)
RESTART_DOWN_S = size(2, 10)
PDATA = 0x04


class DbLink(TCPListener):
    """TCP relay node -> PostgreSQL that a test can cut, blackhole and heal."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mode = "up"
        self.flowing = threading.Event()
        self.flowing.set()
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        super().__init__()

    def admit(self, client: socket.socket) -> bool:
        if self.mode == "cut":
            _reset(client)
            return False
        return True

    def on_connection(self, client: socket.socket) -> None:
        self.flowing.wait()  # blackholed: the connection waits, as a dropped SYN would
        if self.mode == "cut":
            _reset(client)
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            _reset(client)
            return
        with self.lock:
            self.pairs.append((client, upstream))
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.flowing.wait()  # blackholed: held, delivered once healed
                if self.mode == "cut":
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Reset every connection and refuse new ones until ``heal``."""
        self.mode = "cut"
        self.flowing.set()  # let held pumps notice the cut and end
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for a, b in pairs:
            _reset(a)
            _reset(b)

    def blackhole(self) -> None:
        """Hold every byte and every new connection until ``heal``."""
        self.mode = "blackhole"
        self.flowing.clear()

    def heal(self) -> None:
        self.mode = "up"
        self.flowing.set()

    def close(self) -> None:
        self.heal()
        self.listener.close()
        self.cut()


def _reset(s: socket.socket) -> None:
    """Close with a TCP RST (what a rejecting firewall or a vanished peer looks like). SHUT_RD
    first: it wakes a relay thread blocked in recv(), which would keep the socket open."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        s.close()


class Fault:
    """One fault for the scenario: ``begin`` it, then ``end`` it ``down_s`` later."""

    def __init__(self, kind: str, cluster: PrivateCluster, link: DbLink) -> None:
        self.kind, self.cluster, self.link = kind, cluster, link
        self.down_s = RESTART_DOWN_S if kind == "restart" else PARTITION_S

    def begin(self) -> None:
        if self.kind == "restart":
            self.cluster.stop("fast")
        elif self.kind == "partition":
            self.link.blackhole()
        else:
            self.link.cut()

    def end(self) -> None:
        if self.kind == "restart":
            self.cluster.start()
        else:
            self.link.heal()

    def run(self) -> float:
        t0 = time.monotonic()
        self.begin()
        time.sleep(self.down_s)
        self.end()
        return time.monotonic() - t0


# Quick runs (make test) cover a restart and a partition; the full run adds the reset.
FAULTS = ["restart", "partition", *(["reset"] if FULL else [])]


@pytest.fixture(scope="module")
def cluster() -> Any:
    """A private cluster: these tests stop and start it (never the shared pg_server)."""
    c = PrivateCluster()
    try:
        yield c
    finally:
        c.destroy()


@pytest.fixture
def link(cluster: PrivateCluster) -> Any:
    lk = DbLink(cluster.port)
    yield lk
    lk.close()


@pytest.fixture
def db_url(cluster: PrivateCluster, link: DbLink) -> str:
    url = PgServer(cluster.url).new_database()
    return url.replace(f"127.0.0.1:{cluster.port}/", f"127.0.0.1:{link.port}/")


def send_until_acked(ledger: Ledger, port: int, files: list[Path], deadline: float) -> int:
    """Send like a modality that retries: what was not acknowledged goes again a second later,
    on a new association, until everything is or ``deadline`` passes. Returns the rounds."""
    uids = {f: str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    rounds = 0
    while time.monotonic() < deadline:
        todo = [f for f in files if uids[f] not in ledger.acked]
        if not todo:
            break
        rounds += 1
        ledger.send(port, todo, timeout_s=30)
        time.sleep(1.0)
    return rounds


@pytest.mark.parametrize("fault", FAULTS)
def test_postgres_fault_during_ingest(node_factory: Any, cluster: PrivateCluster, link: DbLink,
                                      tmp_path: Path, fault: str) -> None:
    """Three modalities send while the database restarts or is cut off. Every acknowledged
    instance is stored once; every series is completed and queued once the database is back."""
    n_series, per = 3, size(25, 60)
    node: Node = node_factory(series={"quiet_period_s": 2.0}).start()
    sets = [make_series(tmp_path / f"s{i}", n=per, seed=260 + i, size=64) for i in range(n_series)]
    ledger = Ledger()
    f = Fault(fault, cluster, link)
    t0 = time.monotonic()
    deadline = t0 + f.down_s + 120
    senders = [threading.Thread(target=send_until_acked, args=(ledger, node.port, files, deadline))
               for files in sets]
    for t in senders:
        t.start()
    time.sleep(1.0)  # mid-series
    acked_before = len(ledger.acked)
    down = f.run()
    for t in senders:
        t.join()
    elapsed = time.monotonic() - t0
    out = reconcile(node, ledger)
    recs = node.wait_all(n_series, {"queued"}, 60)
    record(f"pg-{fault}", n_series, ledger, out, elapsed,
           note=f"database {fault} {down:.0f} s during ingest; {acked_before} acked before, "
                f"{len(ledger.acked)} after")
    assert len(ledger.acked) == n_series * per, "the modalities' resends were not all accepted"
    assert out == {"lost": 0, "duplicates": 0, "tmp_left": 0}
    assert [r["state"] for r in recs] == ["queued"] * n_series, recs
    assert all(r["instances"] == per for r in recs), recs
    assert storescu(node.port, sets[0][:1]).returncode == 0  # still taking instances
    assert node.proc is not None and node.proc.poll() is None


class TriggerRelay(TCPListener):
    """A relay in front of the PACS that runs ``on_store`` (once) when the first C-STORE request
    goes through, so the fault hits while the node is delivering."""

    def __init__(self, backend_port: int, on_store: Any) -> None:
        self.backend_port = backend_port
        self.on_store = on_store
        self.fired = threading.Event()
        super().__init__()

    def on_connection(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.backend_port))

        def back() -> None:
            with contextlib.suppress(OSError):
                while data := upstream.recv(65536):
                    client.sendall(data)

        threading.Thread(target=back, daemon=True).start()
        try:
            while data := client.recv(65536):
                if data[0] == PDATA and not self.fired.is_set():
                    self.fired.set()
                    self.on_store()
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("fault", FAULTS)
def test_postgres_fault_during_delivery(node_factory: Any, cluster: PrivateCluster,
                                        link: DbLink, tiny_ckpt: Path,  # noqa: F811
                                        tmp_path: Path, fault: str) -> None:
    """The database goes away just as the first result reaches the PACS (so the outcome cannot
    be recorded then). Every result reaches the PACS exactly once, and the node records it."""
    from triage_model.synth import make_case

    from triage_agent.synth_dicom import write_case_dicom

    f = Fault(fault, cluster, link)
    ended = threading.Event()

    def end_fault() -> None:
        f.end()
        ended.set()

    def fault_now() -> None:  # on the relay's thread: the C-STORE waits for the fault to begin
        f.begin()
        threading.Timer(f.down_s, end_fault).start()

    pacs = StoreSCP(tmp_path / "pacs", "-uf")
    relay = TriggerRelay(pacs.port, fault_now)
    node: Node = node_factory(worker={"count": 1, "poll_interval_s": 0.2},
                              model={"weights": str(tiny_ckpt)}, triage={"threshold": -1.0e9},
                              delivery={"backoff_base_s": 1.0, "backoff_cap_s": 4.0})
    node.add_destination("pacs", "PACS", "127.0.0.1", relay.port)
    t0 = time.monotonic()
    try:
        node.start(timeout_s=120)
        files = write_case_dicom(make_case(2626, "normal", matrix=128), tmp_path / "ct")
        assert storescu(node.port, files).returncode == 0
        wait_for(relay.fired.is_set, 120, "the first delivery", interval_s=0.1)
        wait_for(ended.is_set, f.down_s + 60, "the end of the fault", interval_s=0.2)
        recs = node.wait_all(1, {"delivered"}, 90)
        received = sorted(pacs.out.iterdir())
        uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received]
        with node.session()() as s:
            rows = s.execute(select(Delivery.state, Delivery.attempts)).all()
        dups = len(uids) - len(set(uids))
        record(f"pg-{fault}-dlv", 1, None, {"duplicates": dups}, time.monotonic() - t0,
               note=f"database {fault} {f.down_s:.0f} s from the first C-STORE to the PACS; "
                    f"{len(set(uids))}/{len(rows)} objects delivered, {dups} twice")
        assert recs and recs[0]["state"] == "delivered", recs
        assert dups == 0, f"{dups} object(s) delivered twice"
        assert len(set(uids)) == len(rows) and all(r.state == "delivered" for r in rows), rows
    finally:
        node.stop(10)
        relay.close()
        pacs.stop()
