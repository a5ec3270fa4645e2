"""The node against real DCMTK clients, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import subprocess
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import func, select

from tests.conftest import Node, files_under, require_tool, storescu, wait_for
from tests.factories import CANARY_ID, CANARY_NAME, CT, make_series
from triage_agent.models import Event, Instance, Job, Series


def count(node: Node, model: type, *where: object) -> int:
    with node.session()() as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def test_echo(node: Node) -> None:
    exe = require_tool("echoscu", "dcmtk")
    r = subprocess.run([exe, "-aec", "TRIAGE", "127.0.0.1", str(node.port)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_ct_series_stored_completed_queued_and_resend_is_idempotent(
    node: Node, tmp_path: Path
) -> None:
    files = make_series(tmp_path / "ct", n=40, seed=1)
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    r = storescu(node.port, files)
    assert r.returncode == 0, r.stderr
    # Every file is on disk, byte-for-byte what the row says, inside the storage root.
    with node.session()() as s:
        rows = s.scalars(select(Instance)).all()
        assert len(rows) == 40
        for row in rows:
            p = node.storage_root / row.path
            assert hashlib.sha256(p.read_bytes()).hexdigest() == row.sha256
            back = pydicom.dcmread(p)
            assert back.SOPInstanceUID == row.sop_instance_uid
    rec = node.wait_state(uid, {"queued"})
    assert rec["instances"] == 40
    assert count(node, Job) == 1

    # Resending the same series: Success, no new rows, no new job.
    r = storescu(node.port, files)
    assert r.returncode == 0, r.stderr
    assert count(node, Instance) == 40
    rec = node.wait_state(uid, {"queued"})
    assert rec["instances"] == 40 and rec["jobs"] == 1
    assert count(node, Job) == 1
    # Patient identifiers are in the files, never in the node's log.
    log = node.log_path.read_text()
    assert "association accepted" in log
    assert CANARY_NAME not in log and CANARY_ID not in log and "CANARY" not in log


def test_mr_refused_unless_configured(node: Node, tmp_path: Path) -> None:
    files = make_series(tmp_path / "mr", n=3, seed=2, modality="MR", size=64)
    # By default the node accepts CT only: MR is refused at presentation-context negotiation.
    r = storescu(node.port, files)
    assert r.returncode != 0
    assert "no presentation context" in (r.stdout + r.stderr).lower()
    assert count(node, Instance) == 0


def test_mr_series_skipped_with_reason(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mr = "1.2.840.10008.5.1.4.1.1.4"
    node = node_factory(storage={"extra_sop_classes": [mr]}).start()
    files = make_series(tmp_path / "mr", n=25, seed=2, modality="MR", size=64)
    uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    assert storescu(node.port, files).returncode == 0
    assert count(node, Instance) == 25
    # Recorded as ignored, no pixel data kept.
    assert not files_under(node.storage_root / "dicom")
    rec = node.wait_state(uid, {"skipped"})
    assert rec["reason"].startswith("modality MR")
    assert "pixel data not kept" in rec["reason"]
    assert count(node, Job) == 0


def test_coronal_and_short_series_skipped_with_reasons(node: Node, tmp_path: Path) -> None:
    cor = make_series(tmp_path / "cor", n=30, seed=3, orientation="coronal", size=64)
    short = make_series(tmp_path / "short", n=3, seed=4, size=64)
    assert storescu(node.port, cor + short).returncode == 0
    rec = node.wait_state(pydicom.dcmread(cor[0]).SeriesInstanceUID, {"skipped"})
    assert rec["reason"] == "coronal reformat"
    rec = node.wait_state(pydicom.dcmread(short[0]).SeriesInstanceUID, {"skipped"})
    assert rec["reason"] == "only 3 slices (minimum 20)"
    assert count(node, Job) == 0


@pytest.mark.parametrize(
    ("called", "calling", "expect"),
    [("WRONG", "MODALITY", "Called AE Title Not Recognized"),
     ("TRIAGE", "INTRUDER", "Calling AE Title Not Recognized")],
)
def test_association_policy_rejects_and_stores_nothing(
    node_factory, tmp_path: Path, called: str, calling: str, expect: str  # type: ignore[no-untyped-def]
) -> None:
    node = node_factory(security={"allowed_calling_ae_titles": ["MODALITY"]}).start()
    files = make_series(tmp_path / "ct", n=3, seed=5, size=64)
    r = storescu(node.port, files, called=called, calling=calling)
    assert r.returncode != 0
    assert expect.lower() in (r.stdout + r.stderr).lower()
    assert count(node, Instance) == 0
    assert not files_under(node.storage_root / "dicom")
    assert count(node, Event, Event.kind == "association_rejected") == 1


def test_unlisted_source_address_rejected(node_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = node_factory(security={"allowed_networks": ["10.99.0.0/16"]}).start()
    files = make_series(tmp_path / "ct", n=2, seed=6, size=64)
    r = storescu(node.port, files)
    assert r.returncode != 0
    assert count(node, Instance) == 0

    def rejected() -> list[Event]:  # audit events reach the database through the audit writer
        with node.session()() as s:
            return list(s.scalars(select(Event).where(Event.kind == "association_rejected")))

    (ev,) = wait_for(rejected, 10, "an association_rejected audit event")
    assert "127.0.0.1" in (ev.detail or "")


def _send_raw(port: int, payload: bytes, sop_uid: str) -> int:
    """Send raw dataset bytes (as a file) with pynetdicom, bypassing any client-side checks."""
    from pynetdicom import _config

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    assert assoc.is_established
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        tmp = Path(f"/tmp/raw-{sop_uid[-8:].replace('/', '_')}.dcm")
        tmp.write_bytes(payload)
        status = assoc.send_c_store(tmp)
        tmp.unlink()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return int(status.Status)


def test_truncated_and_traversal_datasets_get_failures_and_write_nothing(
    node: Node, tmp_path: Path
) -> None:
    files = make_series(tmp_path / "ct", n=2, seed=7, size=64)
    good = files[0].read_bytes()
    status = _send_raw(node.port, good[: len(good) // 2], "trunc")
    assert status in (0xA900, 0xC210), hex(status)

    ds = pydicom.dcmread(files[1])
    evil = "1.2.3/../../../../tmp/evil"
    ds.SOPInstanceUID = evil
    ds.file_meta.MediaStorageSOPInstanceUID = evil
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    status = _send_raw(node.port, buf.getvalue(), "evil")
    assert status == 0xC220, hex(status)

    ds.SOPInstanceUID = "1.2.3.4"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "../../etc"
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert _send_raw(node.port, buf.getvalue(), "evil2") == 0xC220

    assert count(node, Instance) == 0
    assert not files_under(node.storage_root / "dicom")
    assert not files_under(node.storage_root / "tmp")
    assert not list(Path("/tmp").glob("evil*"))
    assert count(node, Event, Event.kind == "store_failed") == 3
    # The node keeps serving other senders.
    assert storescu(node.port, files[:1]).returncode == 0
    assert count(node, Instance) == 1


def test_same_uid_other_content_is_quarantined(node: Node, tmp_path: Path) -> None:
    a = make_series(tmp_path / "a", n=1, seed=8, size=64)
    b = make_series(tmp_path / "b", n=1, seed=8, size=64, description="HEAD other")
    assert storescu(node.port, a).returncode == 0
    assert storescu(node.port, b).returncode == 0
    assert count(node, Instance) == 1
    with node.session()() as s:
        row = s.scalars(select(Instance)).one()
        kept = pydicom.dcmread(node.storage_root / row.path)
        assert kept.SeriesDescription == "HEAD W/O 5mm"
    q = files_under(node.storage_root / "quarantine")
    assert len(q) == 1 and pydicom.dcmread(q[0]).SeriesDescription == "HEAD other"
    assert count(node, Event, Event.kind == "instance_conflict") == 1


def test_late_instances_reopen_and_requeue(node: Node, tmp_path: Path) -> None:
    files = make_series(tmp_path / "ct", n=25, seed=9, size=64)
    uid = pydicom.dcmread(files[0]).SeriesInstanceUID
    assert storescu(node.port, files[:22]).returncode == 0
    node.wait_state(uid, {"queued"})
    assert storescu(node.port, files[22:]).returncode == 0
    rec = node.wait_state(uid, {"queued"}, timeout_s=30)
    assert rec["instances"] == 25
    with node.session()() as s:
        jobs = s.scalars(select(Job).order_by(Job.id)).all()
        assert [(j.generation, j.state) for j in jobs] == [(1, "cancelled"), (2, "queued")]
        assert s.scalar(select(Series.generation)) == 2

