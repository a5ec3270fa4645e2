"""The docs/reliability.md scenarios, each ending with the ledger reconciliation and a summary row."""

from __future__ import annotations

import hashlib
import random
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import func, select

from tests.conftest import Node, storescu, wait_for
from tests.factories import CANARY_ID, CANARY_NAME, CT, make_series
from tests.reliability.conftest import Ledger, reconcile, record, size
from tests.test_model_e2e import tiny_ckpt  # noqa: F401  (module-scoped fixture)
from tests.test_node import _send_raw
from triage_agent.models import Event, Instance, Series

pytestmark = pytest.mark.reliability


def series_set(tmp: Path, n_series: int, n: int, seed: int, px: int = 64) -> list[list[Path]]:
    return [make_series(tmp / f"s{seed}_{i}", n=n, seed=seed * 1000 + i, size=px)
            for i in range(n_series)]


def wait_terminal(node: Node, n_series: int, timeout_s: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    recs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        recs = node.status()
        if len(recs) >= n_series and all(r["state"] in ("queued", "skipped", "scored",
                                                         "delivered", "failed") for r in recs):
            return recs
        time.sleep(0.5)
    raise AssertionError(f"series not complete: {[r['state'] for r in recs]}")


def test_load(node_factory: Any, tmp_path: Path) -> None:
    """N concurrent associations (half DCMTK storescu, half pynetdicom) x M instances."""
    n_assoc, per = size(6, 20), size(40, 200)
    node: Node = node_factory(node={"max_associations": 32, "max_connections_per_address": 32},
                              series={"quiet_period_s": 2.0}).start()
    sets = series_set(tmp_path, n_assoc, per, seed=1)
    ledger = Ledger()
    t0 = time.perf_counter()
    threads = []
    procs = []
    for i, files in enumerate(sets):
        if i % 2:
            threads.append(threading.Thread(target=ledger.send, args=(node.port, files)))
        else:
            procs.append((files, subprocess.Popen(
                ["storescu", "-aec", "TRIAGE", "-aet", f"LOAD{i}", "127.0.0.1", str(node.port),
                 *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for files, p in procs:
        assert p.wait(600) == 0
        for f in files:  # storescu exits 0 only if every store succeeded
            ds = pydicom.dcmread(f)
            ledger.acked[ds.SOPInstanceUID] = hashlib.sha256(ds.PixelData).hexdigest()
    elapsed = time.perf_counter() - t0
    out = reconcile(node, ledger)
    recs = wait_terminal(node, n_assoc)
    assert all(r["state"] == "queued" for r in recs) and len(recs) == n_assoc
    p95 = statistics.quantiles(ledger.latencies, n=20)[-1] if len(ledger.latencies) > 20 else 0
    record("load", n_assoc, ledger, out, elapsed,
           f"{len(ledger.acked) / elapsed:.0f} inst/s, p95 store {p95 * 1000:.0f} ms "
           f"({n_assoc} assoc x {per})")
    assert len(ledger.acked) == n_assoc * per
    assert out == {"lost": 0, "duplicates": 0, "tmp_left": 0}


def test_kill(node_factory: Any, tmp_path: Path) -> None:
    """kill -9 at random moments while instances stream; restart; nothing acknowledged is lost."""
    rounds = size(4, 20)
    rng = random.Random(7)
    node: Node = node_factory(series={"quiet_period_s": 1.5}).start()
    files = series_set(tmp_path, 1, 120, seed=2, px=128)[0]
    ledger = Ledger()
    t0 = time.perf_counter()
    for _ in range(rounds):
        stop = threading.Event()
        sender = threading.Thread(target=ledger.send, args=(node.port, files),
                                  kwargs={"stop": stop, "timeout_s": 5})
        sender.start()
        time.sleep(rng.uniform(0.05, 1.5))  # a random moment of the stream (or just after it)
        node.kill()
        stop.set()
        sender.join(30)
        node.start()
        out = reconcile(node, ledger)
        assert out["lost"] == 0 and out["duplicates"] == 0, out
        assert out["tmp_left"] == 0
    ledger.send(node.port, files)  # the modality retries the whole series
    out = reconcile(node, ledger)
    recs = wait_terminal(node, 1)
    with node.session()() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == len(files)
    record("kill", rounds, ledger, out, time.perf_counter() - t0,
           f"kill -9 during receive; series {recs[0]['state']} with {recs[0]['instances']} inst")
    assert out == {"lost": 0, "duplicates": 0, "tmp_left": 0}


def test_dup(node_factory: Any, tmp_path: Path) -> None:
    """The same study from two associations at once; then same UIDs with other content."""
    node: Node = node_factory().start()
    files = series_set(tmp_path, 1, size(30, 100), seed=3)[0]
    ledger = Ledger()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=ledger.send, args=(node.port, files)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other = make_series(tmp_path / "other", n=5, seed=3000, size=64, description="changed")
    assert storescu(node.port, other).returncode == 0  # same UIDs, other content
    out = reconcile(node, ledger)
    with node.session()() as s:
        rows = s.scalar(select(func.count()).select_from(Instance))
        conflicts = s.scalar(select(func.count()).select_from(Event)
                             .where(Event.kind == "instance_conflict"))
    quarantined = len(list((node.storage_root / "quarantine").glob("*.dcm")))
    record("dup", 2, ledger, out, time.perf_counter() - t0,
           f"{rows} rows for {len(files)} UIDs; {quarantined} quarantined, {conflicts} audited")
    assert rows == len(files) and quarantined == conflicts == 5
    assert out == {"lost": 0, "duplicates": 0, "tmp_left": 0}


def test_aet(node_factory: Any, tmp_path: Path) -> None:
    node: Node = node_factory(security={"allowed_calling_ae_titles": ["MODALITY"],
                                        "allowed_networks": ["127.0.0.1/32"]}).start()
    files = series_set(tmp_path, 1, 3, seed=4)[0]
    t0 = time.perf_counter()
    refused = 0
    refused += storescu(node.port, files, called="NOTUS").returncode != 0
    refused += storescu(node.port, files, calling="STRANGER").returncode != 0
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TRIAGE",
                         bind_address=("127.0.0.9", 0))  # right AE titles, unlisted address
    # The node sends A-ASSOCIATE-RJ and closes; a client may see the close first (aborted).
    refused += not assoc.is_established
    if assoc.is_established:
        assoc.release()
    ledger = Ledger()
    r = subprocess.run(["storescu", "-aec", "TRIAGE", "-aet", "MODALITY", "127.0.0.1",
                        str(node.port), str(files[0])], capture_output=True)
    assert r.returncode == 0  # the listed address with the listed AE title works
    with node.session()() as s2:
        rejected = s2.scalar(select(func.count()).select_from(Event)
                             .where(Event.kind == "association_rejected"))
        stored = s2.scalar(select(func.count()).select_from(Instance))
    record("aet", 2, ledger, {"failures": refused}, time.perf_counter() - t0,
           f"{refused} refused (called AE, calling AE, address), {rejected} audited, "
           f"{stored} stored (the allowed one)")
    assert refused == 3 and rejected == 3 and stored == 1


def _raw(port: int, payload: bytes, wait_s: float = 2.0) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=wait_s)
    try:
        s.sendall(payload)
        s.settimeout(wait_s)
        try:
            while s.recv(4096):
                pass
        except (TimeoutError, ConnectionResetError):
            pass
    finally:
        s.close()


def test_pdu(node_factory: Any, tmp_path: Path) -> None:
    """Malformed PDUs while a real sender stores: node alive, the sender unaffected."""
    node: Node = node_factory(node={"idle_timeout_s": 3.0}).start()
    files = series_set(tmp_path, 1, size(30, 200), seed=5)[0]
    ledger = Ledger()
    t0 = time.perf_counter()
    sender = threading.Thread(target=ledger.send, args=(node.port, files))
    sender.start()
    bad = [
        b"\x01\x00\x00\x00\x00\x10\x00\x01",  # truncated A-ASSOCIATE-RQ
        b"\x04\x00\xff\xff\xff\xf0" + b"\x00" * 1024,  # P-DATA declaring ~4 GiB
        b"\x09\x00\x00\x00\x00\x04abcd",  # unknown PDU type
        b"\x04\x00\x00\x00\x00\x0a" + b"\x00" * 10,  # data before association
        bytes(random.Random(1).getrandbits(8) for _ in range(4096)),  # noise
    ]
    for payload in bad * size(2, 10):
        _raw(node.port, payload)
    sender.join(120)
    out = reconcile(node, ledger)
    # Broken associations are cleaned up within idle_timeout_s + the kill grace, not ARTIM.
    deadline = time.monotonic() + 10
    while True:
        r = subprocess.run(["echoscu", "-aec", "TRIAGE", "127.0.0.1", str(node.port)],
                           capture_output=True)
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    record("pdu", len(bad) * size(2, 10), ledger, out, time.perf_counter() - t0,
           "truncated, 4 GiB length, unknown type, data before assoc, noise; echo "
           + ("ok" if r.returncode == 0 else "FAILED"))
    assert r.returncode == 0 and len(ledger.acked) == len(files)
    assert out == {"lost": 0, "duplicates": 0, "tmp_left": 0}


def _with_deep_sequence(raw: bytes, depth: int) -> bytes:
    """Insert a ContentSequence nested ``depth`` deep (undefined lengths, explicit VR LE) just
    before Pixel Data; built as bytes because pydicom itself cannot write such depth."""
    open_level = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    close_level = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    at = raw.rindex(b"\xe0\x7f\x10\x00")
    return raw[:at] + open_level * depth + close_level * depth + raw[at:]


def test_data(node_factory: Any, tmp_path: Path) -> None:
    """Bad datasets get a failure status (or are skipped), never a crash; nothing escapes."""
    from pydicom.data import get_testdata_file

    node: Node = node_factory().start()
    base = make_series(tmp_path / "base", n=1, seed=6, size=64)[0]
    cases: dict[str, bytes] = {}

    def encoded(ds: pydicom.Dataset) -> bytes:
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    ds = pydicom.dcmread(base)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3/../../../etc/x"
    cases["traversal uid"] = encoded(ds)
    ds = pydicom.dcmread(base)
    ds.Rows = 4096
    cases["pixels != rows x cols"] = encoded(ds)
    ds = pydicom.dcmread(base)
    ds.Rows = ds.Columns = 60000
    cases["absurd dimensions"] = encoded(ds)
    ds = pydicom.dcmread(base)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6"
    cases["10000-deep sequence"] = _with_deep_sequence(encoded(ds), 10000)
    raw = base.read_bytes()
    cases["truncated"] = raw[: len(raw) // 2]
    cases["garbage"] = raw[:200] + bytes(range(256)) * 8
    for name in ("CT_small.dcm", "rtdose.dcm", "no_meta.dcm"):
        path = get_testdata_file(name)
        if path:
            cases[f"pydicom {name}"] = Path(path).read_bytes()
    t0 = time.perf_counter()
    statuses = {}
    for name, payload in cases.items():
        try:
            statuses[name] = _send_raw(node.port, payload, hashlib.md5(name.encode()).hexdigest())
        except Exception as e:  # the association itself refused (e.g. SOP class not offered)
            statuses[name] = f"not sent: {e.__class__.__name__}"
    r = subprocess.run(["echoscu", "-aec", "TRIAGE", "127.0.0.1", str(node.port)],
                       capture_output=True)
    outside = [p for p in Path("/tmp").glob("*") if p.name in ("x", "etc")]
    failures = sum(1 for v in statuses.values() if v != 0)
    record("data", len(cases), None, {"failures": failures}, time.perf_counter() - t0,
           "; ".join(f"{k}: {hex(v) if isinstance(v, int) else v}" for k, v in statuses.items()))
    assert r.returncode == 0 and not outside
    assert statuses["traversal uid"] == 0xC220 and statuses["truncated"] in (0xA900, 0xC210)
    assert statuses["pixels != rows x cols"] == 0xA900
    assert statuses["absurd dimensions"] == 0xA900
    assert not (node.storage_root / "tmp").exists() or not any((node.storage_root / "tmp").iterdir())


@pytest.mark.skipif(shutil.which("mount") is None, reason="needs mount for a small tmpfs")
def test_disk(node_factory: Any, tmp_path: Path) -> None:
    """Storage on a small tmpfs: above the high-water mark 0xA700; recovery once space returns."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        node: Node = node_factory(storage={"root": str(mnt / "storage"),
                                           "high_water_percent": 60}).start()
        files = make_series(tmp_path / "big", n=40, seed=8, size=256)  # ~128 KB each
        ledger = Ledger()
        t0 = time.perf_counter()
        ledger.send(node.port, files)
        refused_at = len(ledger.acked)
        # Some instances fit, then every further one is answered 0xA700 (how many fit depends on
        # when the node re-reads the disk usage, once a second).
        assert 0 < refused_at < len(files) and ledger.failures == len(files) - refused_at
        filler = mnt / "filler"
        assert "storage above high-water" in node.log_path.read_text()
        out = reconcile(node, ledger)
        assert out == {"lost": 0, "duplicates": 0, "tmp_left": 0}
        # Space returns (an admin moves data away): the same sender succeeds.
        for p in list((mnt / "storage" / "dicom").rglob("*.dcm"))[: refused_at // 2]:
            shutil.move(str(p), tmp_path / p.name)  # simulate archiving, keep for the ledger
        time.sleep(1.2)  # the node re-reads usage once a second
        more = Ledger()
        more.send(node.port, make_series(tmp_path / "more", n=3, seed=81, size=256))
        record("disk", 1, ledger, out, time.perf_counter() - t0,
               f"refused after {refused_at} instances at 60 % of 8 MB; "
               f"{len(more.acked)}/3 stored after space returned")
        assert len(more.acked) == 3
        assert not filler.exists()
    finally:
        node.stop(10)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_term(node_factory: Any, tmp_path: Path) -> None:
    """SIGTERM while a sender streams: the in-flight association finishes, nothing is lost."""
    node: Node = node_factory(series={"quiet_period_s": 1.0}).start()
    files = series_set(tmp_path, 1, size(60, 200), seed=9, px=128)[0]
    ledger = Ledger()
    t0 = time.perf_counter()
    sender = threading.Thread(target=ledger.send, args=(node.port, files))
    sender.start()
    time.sleep(0.3)
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    sender.join(60)
    rc = node.proc.wait(60)
    node.proc = None
    node.start()
    out = reconcile(node, ledger)
    record("term", 1, ledger, out, time.perf_counter() - t0,
           f"exit {rc}; {len(ledger.acked)}/{len(files)} acknowledged before shutdown")
    assert rc == 0 and len(ledger.acked) == len(files)  # in-flight association was finished
    assert out == {"lost": 0, "duplicates": 0, "tmp_left": 0}


def test_phi(node_factory: Any, tmp_path: Path) -> None:
    """Canary identifiers in every instance; none in logs, metrics or error columns."""
    node: Node = node_factory().start()
    files = series_set(tmp_path, 2, 25, seed=10)
    t0 = time.perf_counter()
    for f in files:
        assert storescu(node.port, f).returncode == 0
    storescu(node.port, files[0][:1], called="WRONG")
    raw = files[0][0].read_bytes()
    _send_raw(node.port, raw[: len(raw) // 2], "phi")
    wait_terminal(node, 2)
    import urllib.request

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics").read().decode()
    page = urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/").read().decode()
    with node.session()() as s:
        cols = [e.detail or "" for e in s.scalars(select(Event))]
        cols += [x.reason or "" for x in s.scalars(select(Series))]
    blob = "\n".join([node.log_path.read_text(), metrics, page, *cols])
    hits = sum(blob.count(c) for c in (CANARY_NAME, CANARY_ID, "CANARY"))
    record("phi", 1, None, {"failures": hits}, time.perf_counter() - t0,
           f"{hits} canary occurrences in log, /metrics, status page, audit/error columns")
    assert hits == 0


def test_pacs(node_factory: Any, tiny_ckpt: Path, tmp_path: Path) -> None:  # noqa: F811
    """Destination down (connection refused: retried with capped backoff), then rejecting
    associations (A-ASSOCIATE-RJ permanent: dead-lettered), then up: an admin runs
    `triage-agent retry` and everything is delivered, nothing twice."""
    from tests.peers import StoreSCP, free_port

    port = free_port()
    node: Node = node_factory(
        worker={"count": 1, "poll_interval_s": 0.2}, model={"weights": str(tiny_ckpt)},
        triage={"threshold": -1.0e9},
        delivery={"interval_s": 0.3, "backoff_base_s": 0.5, "backoff_cap_s": 2.0,
                  "timeout_s": 3.0, "max_attempts": 100, "breaker_cooldown_s": 0.5,
                  "breaker_cooldown_cap_s": 1.0},
    )
    node.add_destination("pacs", "PACS", "127.0.0.1", port)
    node.start(timeout_s=120)
    from triage_model.synth import make_case

    from triage_agent.synth_dicom import write_case_dicom

    n_series = size(2, 6)
    sets = [write_case_dicom(make_case(700 + i, "normal", matrix=128), tmp_path / f"p{i}")
            for i in range(n_series)]
    t0 = time.perf_counter()
    for f in sets:
        assert storescu(node.port, f).returncode == 0

    def deliveries() -> list[dict[str, Any]]:
        """Every series' deliveries once all are scored, else nothing."""
        recs = node.status()
        if len(recs) != n_series or not all(r.get("deliveries") for r in recs):
            return []
        return [d for r in recs for d in r["deliveries"]]

    # PACS down: wait (not a fixed sleep, which a loaded machine outruns) until every series is
    # scored and delivery has been tried and failed (the circuit breaker then holds the rest).
    wait_for(lambda: any(d["attempts"] > 0 for d in deliveries()), 120,
             "a delivery tried while the PACS is down")
    refusing = StoreSCP(tmp_path / "refused", "--refuse", port=port)
    # PACS refusing associations: a rejection is permanent, so deliveries become dead letters.
    wait_for(lambda: any(d["state"] == "dead" for d in deliveries()), 60,
             "a dead letter while the PACS refuses associations")
    time.sleep(1.0)  # let more of them meet the refusal
    refusing.stop()
    outdir = tmp_path / "pacs"
    pacs = StoreSCP(outdir, port=port)
    try:
        dead = sum(d["state"] == "dead" for r in node.status() for d in r.get("deliveries", []))
        r = node.cli("retry")
        assert r.returncode == 0 and f"{dead} dead-lettered" in r.stdout
        recs = node.wait_all(n_series, {"delivered"}, 120)
        received = list(outdir.iterdir())
        expected = sum(len(r["deliveries"]) for r in recs)
        record("pacs", n_series, None, {"failures": 0, "duplicates": len(received) - expected},
               time.perf_counter() - t0,
               f"down, rejecting ({dead} dead-lettered, then `retry`), up: "
               f"{len(received)}/{expected} objects delivered")
        assert all(r["state"] == "delivered" for r in recs) and len(recs) == n_series
        assert len(received) == expected and dead > 0
    finally:
        pacs.stop()



def test_kill_pipeline(node_factory: Any, tiny_ckpt: Path, tmp_path: Path) -> None:  # noqa: F811
    """kill -9 during inference, output building and delivery; after restarts every series is
    delivered and the PACS holds exactly one SR and one heat-map series per series."""
    from triage_model.synth import make_case

    from tests.peers import StoreSCP
    from triage_agent.synth_dicom import write_case_dicom

    rounds, n_series = size(2, 20), size(1, 6)
    outdir = tmp_path / "pacs"
    pacs = StoreSCP(outdir)
    port = pacs.port
    node: Node = node_factory(
        worker={"count": 1, "poll_interval_s": 0.1, "lease_s": 5.0, "max_attempts": 50},
        model={"weights": str(tiny_ckpt)}, triage={"threshold": -1.0e9},
        series={"quiet_period_s": 1.0}, delivery={"interval_s": 0.2, "backoff_base_s": 0.2,
                                                   "backoff_cap_s": 1.0, "max_attempts": 100},
    )
    node.add_destination("pacs", "PACS", "127.0.0.1", port)
    node.start(timeout_s=120)
    rng = random.Random(11)
    sets = [write_case_dicom(make_case(900 + i, "normal", matrix=128), tmp_path / f"k{i}")
            for i in range(n_series)]
    ledger = Ledger()
    t0 = time.perf_counter()
    try:
        for f in sets:
            ledger.send(node.port, f)
        for _ in range(rounds):
            time.sleep(rng.uniform(0.2, 2.5))  # somewhere in complete/claim/infer/build/send
            node.kill()
            node.start(timeout_s=120)
        recs = node.wait_all(n_series, {"delivered"}, 240)
        out = reconcile(node, ledger)
        objects = [p.name for p in outdir.iterdir()]
        sr = [n for n in objects if n.startswith("SR")]
        other = [n for n in objects if not n.startswith("SR")]
        record("kill-pipe", rounds, ledger, {**out, "duplicates": len(sr) - n_series},
               time.perf_counter() - t0,
               f"kill -9 during inference/outputs/delivery; {len(sr)} SR + {len(other)} SC "
               f"objects in the PACS for {n_series} series")
        assert all(r["state"] == "delivered" for r in recs) and len(recs) == n_series, recs
        assert len(sr) == n_series and len(other) == 5 * n_series
        assert out == {"lost": 0, "duplicates": 0, "tmp_left": 0}
    finally:
        pacs.stop()


@pytest.mark.postgres
def test_db_down(tmp_path: Path) -> None:
    """PostgreSQL stops mid-stream: C-STOREs get 0xA700 (never Success), the node stays up, and
    once the database is back the same sender stores again; nothing acknowledged is lost."""
    from tests.conftest import PrivateCluster

    cluster = PrivateCluster()
    node = Node(tmp_path / "node", cluster.url)
    try:
        node.start()
        files = series_set(tmp_path, 1, size(60, 200), seed=12)[0]
        ledger = Ledger()
        t0 = time.perf_counter()
        half = len(files) // 2
        ledger.send(node.port, files[:half])
        cluster.stop("fast")
        down = Ledger()
        down.send(node.port, files[half:half + 5])
        assert not down.acked and down.failures == 5  # each refused, none acknowledged
        log = node.log_path.read_text()
        assert "C-STORE refused (0xA700): database error" in log
        cluster.start()
        time.sleep(1.0)
        ledger.send(node.port, files[half:])
        out = reconcile(node, ledger)
        record("db-down", 1, ledger, out, time.perf_counter() - t0,
               "PostgreSQL stopped mid-stream: 0xA700, node up; after restart all stored")
        assert len(ledger.acked) == len(files)
        assert out == {"lost": 0, "duplicates": 0, "tmp_left": 0}
    finally:
        node.stop(10)
        cluster.destroy()
