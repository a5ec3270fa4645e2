"""kill -9 while a sender streams: nothing acknowledged is lost, the series is queued once."""

from __future__ import annotations

import hashlib
import random
import threading
from pathlib import Path

import pydicom
from pynetdicom import AE
from sqlalchemy import func, select

from tests.conftest import Node, files_under
from tests.factories import CT, make_series
from triage_agent import pynetdicom_compat
from triage_agent.models import Instance, Job


def stream(port: int, files: list[Path], ledger: list[str], stop_after: threading.Event) -> None:
    """Send files one by one on one association; record each SOP UID that got Success."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    if not assoc.is_established:
        return
    # a modality's answers must not get lost in pynetdicom's requestor (see that function)
    pynetdicom_compat.keep_responses_for_the_caller(assoc)
    for f in files:
        ds = pydicom.dcmread(f)
        try:
            status = assoc.send_c_store(ds)
        except Exception:
            break
        if status and getattr(status, "Status", None) == 0x0000:
            ledger.append(ds.SOPInstanceUID)
        if not assoc.is_established:
            break
    if assoc.is_established:
        assoc.release()
    stop_after.set()


def test_kill_9_during_stream_loses_nothing(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(1234)
    files = make_series(tmp_path / "ct", n=60, seed=42, size=128)
    series_uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    node: Node = node_factory(series={"quiet_period_s": 2.0, "sweep_interval_s": 0.2}).start()
    ledger: list[str] = []
    for _round in range(3):
        kill_at = len(ledger) + rng.randint(3, 12)
        done = threading.Event()
        sender = threading.Thread(target=stream, args=(node.port, files, ledger, done))
        sender.start()
        while len(ledger) < kill_at and not done.is_set():
            pass  # spin: kill at a precise, random point of the stream
        node.kill()
        sender.join(30)
        node.start()
        # After restart every acknowledged instance is on disk with its digest and in the DB.
        with node.session()() as s:
            rows = {r.sop_instance_uid: r for r in s.scalars(select(Instance)).all()}
        missing = [u for u in ledger if u not in rows]
        assert not missing, f"acknowledged but lost: {len(missing)}"
        for uid in ledger:
            p = node.storage_root / rows[uid].path
            assert hashlib.sha256(p.read_bytes()).hexdigest() == rows[uid].sha256
        assert not files_under(node.storage_root / "tmp"), "temp files left after restart"
    # The modality retries the whole series; it completes and is queued exactly once.
    done = threading.Event()
    stream(node.port, files, ledger, done)
    rec = node.wait_state(series_uid, {"queued"}, timeout_s=30)
    assert rec["instances"] == 60
    with node.session()() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1
        assert s.scalar(select(func.count()).select_from(Instance)) == 60
