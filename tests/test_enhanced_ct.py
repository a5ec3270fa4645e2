"""Enhanced (multi-frame) CT: a whole series in one instance, its geometry in functional groups.
Converted from a classic synthetic series (highdicom's legacy conversion), it is accepted by the
node, passes the selection rules on its frames, and scores like its classic twin."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import select
from triage_model.checkpoint import load_detector
from triage_model.synth import make_case

from tests.conftest import Node, storescu, wait_for
from tests.test_model_e2e import tiny_ckpt  # noqa: F401  (fixture)
from triage_agent.cli import main
from triage_agent.dicom_uids import IMAGE_SOP_CLASSES
from triage_agent.inference import score_series
from triage_agent.models import Output, Result, Series
from triage_agent.preprocess import read_series
from triage_agent.synth_dicom import write_case_dicom

LEGACY_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"


def twins(root: Path) -> tuple[list[Path], Path]:
    """A classic series and the same slices as one Legacy Converted Enhanced CT instance."""
    classic = write_case_dicom(make_case(71, "normal", matrix=64), root / "classic",
                               write_mask=False)
    datasets = [pydicom.dcmread(f) for f in classic]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets, series_instance_uid=hd.UID(), series_number=9, sop_instance_uid=hd.UID(),
        instance_number=1)
    out = root / "enhanced" / "enhanced.dcm"
    out.parent.mkdir(parents=True)
    enhanced.save_as(out)
    return classic, out


def test_enhanced_twin_scores_like_the_classic_series(tmp_path: Path, tiny_ckpt: Path,  # noqa: F811
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    classic, enhanced = twins(tmp_path)
    assert str(pydicom.dcmread(enhanced, stop_before_pixels=True).SOPClassUID) \
        == LEGACY_ENHANCED_CT
    a, b = read_series(classic), read_series([enhanced])
    assert b.hu.shape == a.hu.shape and b.spacing_mm == pytest.approx(a.spacing_mm)
    assert (b.hu == a.hu).all()
    # slices ordered by position, whatever the frame order (the conversion numbers the frames
    # from the top of the head), each named by its frame of the one instance
    assert a.frame_numbers is None and len(set(b.sop_instance_uids)) == 1
    frames = [int(f or 0) for f in b.frame_numbers or []]
    assert sorted(frames) == list(range(1, len(classic) + 1)) and frames != sorted(frames)

    det = load_detector(tiny_ckpt, device="cpu")
    ra, rb = score_series(classic, det), score_series([enhanced], det)
    assert ra.verdict == rb.verdict and ra.verdict != "not_assessable"
    assert rb.score == pytest.approx(ra.score, abs=1e-3)
    assert [s for _, s in rb.slices] == pytest.approx([s for _, s in ra.slices], abs=1e-3)

    # triage-agent score: the enhanced instance passes the selection rules on its frames
    assert main(["score", str(enhanced), "--model", str(tiny_ckpt), "--json",
                 "--config", str(tmp_path / "absent.toml")]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    got = json.loads(line)
    assert got["verdict"] == ra.verdict and got["score"] == pytest.approx(ra.score, abs=1e-3)
    assert {s["frame"] for s in got["slices"]} <= set(range(1, len(classic) + 1))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_node_scores_enhanced_ct_like_its_classic_twin(
        node_factory: Any, tmp_path: Path, tiny_ckpt: Path) -> None:  # noqa: F811
    assert LEGACY_ENHANCED_CT in IMAGE_SOP_CLASSES
    assert "1.2.840.10008.5.1.4.1.1.2.1" in IMAGE_SOP_CLASSES  # Enhanced CT Image Storage
    classic, enhanced = twins(tmp_path)
    node: Node = node_factory(worker={"count": 1, "poll_interval_s": 0.2},
                              model={"weights": str(tiny_ckpt)}).start()
    # -R: propose the files' own SOP class (storescu's default list lacks the converted one)
    sent = storescu(node.port, [enhanced], extra=["-R"])
    assert sent.returncode == 0, sent.stderr
    uid = str(pydicom.dcmread(enhanced, stop_before_pixels=True).SeriesInstanceUID)
    sessions = node.session()

    def series() -> Series | None:
        with sessions() as s:
            return s.scalars(select(Series).where(Series.series_instance_uid == uid)).first()

    wait_for(lambda: (x := series()) is not None and x.state not in ("receiving", "queued",
                                                                     "processing"),
             120, "scored")
    row = series()
    assert row is not None
    assert (row.state, row.reason) == ("scored", None), row.reason  # not "only 1 slice"
    assert (row.instance_count, row.frame_count) == (1, len(classic))
    first = pydicom.dcmread(classic[0], stop_before_pixels=True)
    assert row.orientation == "axial:0.0" and row.body_part == "HEAD"  # from Frame Anatomy
    assert row.slice_thickness_mm == pytest.approx(float(first.SliceThickness))
    assert row.convolution_kernel == str(first.ConvolutionKernel)

    twin = score_series(classic, load_detector(tiny_ckpt, device="cpu"))
    with sessions() as s:
        result = s.scalars(select(Result).where(Result.series_id == row.id)).one()
        sr_path = s.scalar(select(Output.path).where(Output.result_id == result.id,
                                                     Output.kind == "sr"))
    assert result.verdict == twin.verdict and result.score == pytest.approx(twin.score, abs=1e-3)
    # the report's slice references name frames of the one instance
    sr = pydicom.dcmread(node.storage_root / str(sr_path))
    frames = {int(e.value) for e in sr.iterall() if e.keyword == "ReferencedFrameNumber"}
    assert frames and frames <= set(range(1, len(classic) + 1))
