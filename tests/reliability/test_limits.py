"""Limits stock pynetdicom lacks: slow-drip senders, per-address connection caps, declared PDU
length, association wall clock, dataset size. The node must stay available to real modalities."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE

from tests.conftest import Node, storescu
from tests.factories import CT, make_series

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def trickle(port: int, source_ip: str, stop: threading.Event, closed: list[float]) -> None:
    """Connect from ``source_ip`` and send an A-ASSOCIATE-RQ one byte per 0.3 s, forever."""
    s = socket.socket()
    s.bind((source_ip, 0))
    s.settimeout(0.3)
    try:
        s.connect(("127.0.0.1", port))
        header = b"\x01\x00\x00\x00\x01\x00"  # A-ASSOCIATE-RQ, 256 bytes to follow
        for i in range(10_000):
            if stop.is_set():
                return
            s.sendall(header[i:i + 1] if i < len(header) else b"\x00")
            try:
                if s.recv(1) == b"":
                    closed.append(time.monotonic())
                    return
            except TimeoutError:
                pass
    except OSError:
        closed.append(time.monotonic())
    finally:
        s.close()


def test_slow_senders_cannot_lock_out_a_modality(node_factory: Any, tmp_path: Path) -> None:
    node: Node = node_factory(node={"max_connections_per_address": 4, "idle_timeout_s": 4.0,
                                    "max_associations": 6}).start()
    stop = threading.Event()
    closed: list[float] = []
    t0 = time.monotonic()
    slow = [threading.Thread(target=trickle, args=(node.port, "127.0.0.2", stop, closed))
            for _ in range(6)]  # 4 allowed from that address, 2 refused at once
    for t in slow:
        t.start()
    time.sleep(1.0)
    assert len(closed) == 2, "connections over the per-address limit must be closed at once"
    # The slow ones are still being held open ... and a real modality stores meanwhile.
    files = make_series(tmp_path / "ct", n=5, seed=1, size=64)
    r = storescu(node.port, files)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 4.0, "the store must not wait for the slow senders"
    # Idle limit: every slow-drip connection is aborted though it keeps sending bytes.
    deadline = time.monotonic() + 15
    while len(closed) < 6 and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    for t in slow:
        t.join(5)
    assert len(closed) == 6
    assert all(c - t0 < 10 for c in closed)
    assert "no complete PDU" in node.log_path.read_text()
    assert storescu(node.port, files[:1]).returncode == 0


def test_huge_declared_pdu_length_is_not_read(node: Node) -> None:
    s = socket.create_connection(("127.0.0.1", node.port))
    s.settimeout(10)
    s.sendall(b"\x04\x00\xff\xff\xff\xf0" + b"\x00" * 65536)  # P-DATA claiming ~4 GiB
    t0 = time.monotonic()
    try:
        while s.recv(65536):
            pass
    except (ConnectionResetError, TimeoutError):
        pass
    assert time.monotonic() - t0 < 5, "node kept reading a 4 GiB PDU"
    s.close()
    r = subprocess.run(["echoscu", "-aec", "TRIAGE", "127.0.0.1", str(node.port)],
                       capture_output=True, timeout=30)
    assert r.returncode == 0


def test_association_wall_clock_limit(node_factory: Any) -> None:
    node: Node = node_factory(node={"max_association_s": 3.0}).start()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TRIAGE")
    assert assoc.is_established
    t0 = time.monotonic()
    while assoc.is_established and time.monotonic() - t0 < 15:
        assoc.send_c_echo()  # busy, never idle: only the wall clock can end it
        time.sleep(0.3)
    assert assoc.is_aborted
    assert 2.5 < time.monotonic() - t0 < 8


def test_dataset_size_cap_aborts_and_stores_nothing(node_factory: Any, tmp_path: Path) -> None:
    node: Node = node_factory(node={"max_dataset_mb": 0.2}).start()
    big = make_series(tmp_path / "big", n=1, seed=2, size=512)[0]  # ~0.5 MB
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TRIAGE")
    import pydicom

    status = assoc.send_c_store(pydicom.dcmread(big))
    assert not status or getattr(status, "Status", None) != 0
    deadline = time.monotonic() + 10
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.1)  # the A-ABORT may land just after send_c_store gives up
    assert assoc.is_aborted
    small = make_series(tmp_path / "small", n=1, seed=3, size=64)
    assert storescu(node.port, small).returncode == 0
    assert not list((node.storage_root / "dicom").rglob("*.dcm"))[1:]  # only the small one
