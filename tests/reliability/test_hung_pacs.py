"""A hung PACS must not delay a healthy one: each destination has its own delivery lane, and a
circuit breaker stops trying a destination that keeps timing out until it answers again."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from tests.conftest import Node, storescu, wait_for, write_config
from tests.peers import Orthanc, StoreSCP, TCPListener
from tests.reliability.conftest import FULL, record
from tests.test_model_e2e import tiny_ckpt  # noqa: F401  (module-scoped fixture)
from triage_agent.models import Delivery, Event, Result

pytestmark = pytest.mark.reliability

PDATA = 0x04  # P-DATA-TF: the first one carries the C-STORE request


class HungPACS(TCPListener):
    """A PACS that accepts associations and never answers a C-STORE.

    A TCP relay in front of a real ``storescp``: the association is negotiated with storescp, then
    the first P-DATA (the C-STORE request) is swallowed and the connection held open in silence.
    ``recover()`` makes it relay everything (the PACS answers again); ``drop_held()`` closes the
    held connections (its admin restarts it)."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.hang = True
        self.swallowed = 0
        self.held: list[socket.socket] = []
        self.lock = threading.Lock()
        super().__init__()

    @staticmethod
    def _read_pdu(sock: socket.socket) -> bytes:
        head = b""
        while len(head) < 6:
            chunk = sock.recv(6 - len(head))
            if not chunk:
                return b""
            head += chunk
        body = b""
        length = int.from_bytes(head[2:6], "big")
        while len(body) < length:
            chunk = sock.recv(min(65536, length - len(body)))
            if not chunk:
                return b""
            body += chunk
        return head + body

    def on_connection(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.backend_port))

        def back() -> None:  # storescp -> the node, as it comes
            try:
                while data := upstream.recv(65536):
                    client.sendall(data)
            except OSError:
                pass

        threading.Thread(target=back, daemon=True).start()
        silent = False
        try:
            while pdu := self._read_pdu(client):
                if not silent and self.hang and pdu[0] == PDATA:
                    silent = True
                    with self.lock:
                        self.swallowed += 1
                        self.held.append(client)
                if not silent:
                    upstream.sendall(pdu)
        except OSError:
            pass
        finally:
            for s in (client, upstream):  # shutdown first: it wakes the other direction's recv
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def drop_held(self) -> None:
        with self.lock:
            for s in self.held:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self.held.clear()

    def recover(self) -> None:
        self.hang = False
        self.drop_held()

    def stop(self) -> None:
        self.listener.close()
        self.drop_held()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def circuit_state(node: Node, destination: str) -> float | None:
    """The ``triage_destination_circuit_state`` gauge (0 closed, 1 half-open, 2 open)."""
    text = _get(f"http://127.0.0.1:{node.http_port}/metrics")
    m = re.search(r'^triage_destination_circuit_state\{destination="' + re.escape(destination)
                  + r'"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def sr_seen_at(orthanc: Orthanc, study_uid: str, timeout_s: float) -> dt.datetime | None:
    """UTC time (naive, like the database's) the SR shows up in Orthanc, polled every 0.1 s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(s.get("Modality") == "SR" for s in orthanc.series_of_study(study_uid)):
            return dt.datetime.now(dt.UTC).replace(tzinfo=None)
        time.sleep(0.1)
    return None


def test_hung_pacs(node_factory: Any, tiny_ckpt: Path, tmp_path: Path) -> None:  # noqa: F811
    """A PACS that accepts the association and never answers C-STORE is the first destination,
    Orthanc the second; default delivery settings. Orthanc has the SR within 5 s of scoring;
    the hung one's circuit opens (metric, audit, status page); once it answers again the
    circuit closes and it gets every object once."""
    from triage_model.synth import make_case

    from triage_agent.synth_dicom import write_case_dicom

    backend = StoreSCP(tmp_path / "hung-backend")
    hung = HungPACS(backend.port)
    orthanc = Orthanc(tmp_path / "orthanc").start()
    node: Node = node_factory(worker={"count": 1, "poll_interval_s": 0.2},
                              model={"weights": str(tiny_ckpt)}, triage={"threshold": -1.0e9})
    node.add_destination("hung", "PACS", "127.0.0.1", hung.port)
    node.add_destination("orthanc", "ORTHANC", "127.0.0.1", orthanc.port)
    t0 = time.perf_counter()
    try:
        node.start(timeout_s=120)
        files = write_case_dicom(make_case(4242, "normal", matrix=128), tmp_path / "ct")
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert storescu(node.port, files).returncode == 0
        seen = sr_seen_at(orthanc, study_uid, timeout_s=120)
        assert seen is not None, "Orthanc never received the SR"
        with node.session()() as s:
            scored = s.scalar(select(Result.created_at))
        delay = (seen - scored).total_seconds()
        assert delay < 5.0, f"Orthanc received the SR {delay:.1f} s after scoring"
        assert hung.swallowed >= 1  # the hung one was being tried meanwhile

        # The hung PACS keeps timing out until the circuit opens. Quick runs shorten the
        # timeouts and the cool-down with a reload (SIGHUP) and drop the held association at
        # once; full runs wait for the default timeouts (three times 30 s plus backoff).
        delivery: dict[str, Any] = {}
        if not FULL:
            delivery = {"timeout_s": 1.0, "backoff_base_s": 0.5, "backoff_cap_s": 1.0,
                        "breaker_cooldown_s": 2.0}
            node.sections["delivery"] = delivery
            write_config(node.config, node.sections, node.destinations)
            assert node.proc is not None
            node.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "reload: applied" in node.log_path.read_text(), 10, "the reload")
            hung.drop_held()
        wait_for(lambda: circuit_state(node, "hung") == 2.0, 30 if not FULL else 300,
                 "the hung destination's circuit to open", interval_s=0.2)
        page = _get(f"http://127.0.0.1:{node.http_port}/")
        assert re.search(r"hung: circuit open since \d\d:\d\d:\d\d UTC, \d+ (timeouts|failures)",
                         page), page[-2000:]
        with node.session()() as s:
            opened = s.scalars(select(Event.detail).where(Event.kind == "circuit_opened")).all()
        assert opened and all(d.startswith("hung:") for d in opened)
        assert circuit_state(node, "orthanc") == 0.0

        # The PACS answers again: after the cool-down one probe closes the circuit, and the
        # waiting objects go out; no attempt was spent while the circuit was open.
        hung.recover()
        recs = node.wait_all(1, {"delivered"}, 60 if not FULL else 300)
        assert recs and recs[0]["state"] == "delivered", recs
        with node.session()() as s:
            rows = s.execute(select(Delivery.destination, Delivery.state,
                                    Delivery.attempts)).all()
            closed = s.scalars(select(Event.detail).where(Event.kind == "circuit_closed")).all()
        to_orthanc = [r for r in rows if r.destination == "orthanc"]
        to_hung = [r for r in rows if r.destination == "hung"]
        in_orthanc = sum(len(s["Instances"]) for s in orthanc.series_of_study(study_uid))
        in_backend = [p.name for p in backend.out.iterdir()]
        record("hung-pacs", 1, None,
               {"failures": hung.swallowed, "duplicates": (in_orthanc - len(to_orthanc))
                + (len(in_backend) - len(to_hung))}, time.perf_counter() - t0,
               f"healthy PACS had the SR {delay:.1f} s after scoring; hung one: "
               f"{hung.swallowed} C-STORE(s) unanswered, circuit opened {len(opened)}x, closed "
               f"{len(closed)}x, then {len(in_backend)}/{len(to_hung)} objects delivered")
        assert all(r.state == "delivered" and r.attempts == 1 for r in to_orthanc), to_orthanc
        assert all(r.state == "delivered" for r in to_hung), to_hung
        assert in_orthanc == len(to_orthanc) == len(to_hung) == len(in_backend)
        assert closed and all(d.startswith("hung:") for d in closed)
        assert circuit_state(node, "hung") == 0.0
    finally:
        node.stop(10)
        hung.stop()
        backend.stop()
        orthanc.stop()
