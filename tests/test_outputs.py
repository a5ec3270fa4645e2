"""SR and secondary-capture writers: what a PACS and a radiologist would see.

Every object is written to bytes and read back with pydicom and highdicom, and checked by
``dciodvfy`` (dicom3tools), because an object a PACS rejects or a viewer misreads helps no one.
Set ``TRIAGE_WRITE_DOCS=1`` to refresh ``docs/sc_example.png`` from the realistic example.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import subprocess
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from tests.conftest import REPO, require_tool
from tests.factories import CANARY_ID, CANARY_NAME, make_series
from triage_agent.outputs.common import AlgorithmInfo, OutputError, TriageFinding, derive_uid
from triage_agent.outputs.sc import BANNER_WARN, banner_height, build_sc_series, render_overlay
from triage_agent.outputs.sr import (
    PRIORITY,
    PRIORITY_CODES,
    PRIVATE_SCHEME,
    SCORE,
    THRESHOLD,
    VERDICT,
    VERDICT_CODES,
    build_sr,
)

ALGO = AlgorithmInfo(
    name="brainct-ood-multitask",
    version="1.2.0",
    weights_sha256="3f" * 32,
    manufacturer="triage-agent project",
)
WHEN = datetime(2026, 11, 26, 12, 0, 0)
PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
)
S = 32  # model-space size of the synthetic test slices (small: fast)


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> list[pydicom.Dataset]:
    paths = make_series(tmp_path_factory.mktemp("src"), n=20, seed=11, size=64)
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def _finding(source: list[pydicom.Dataset], verdict: str = "abnormal") -> TriageFinding:
    if verdict == "not_assessable":
        return TriageFinding(verdict, None, 1.0, "routine", "too few brain slices (3 < 8)", [])
    top = [(str(source[i].SOPInstanceUID), s) for i, s in ((12, 2.41), (11, 1.87), (13, 1.52))]
    score = 1.73 if verdict == "abnormal" else 0.42
    return TriageFinding(verdict, score, 1.0, "urgent" if score > 1 else "routine", None, top)


def _roundtrip(ds: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    """Write to bytes (as the sender would), read back, and keep a file for dciodvfy."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue())
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _dciodvfy(path: Path) -> list[str]:
    """dciodvfy output lines; the test fails on any line containing "Error"."""
    exe = require_tool("dciodvfy", "dicom3tools")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln]
    assert not errors, "\n".join(lines)
    return [ln for ln in lines if "Warning" in ln]


def _texts(ds: pydicom.Dataset) -> list[str]:
    """All TEXT values of an SR content tree (str(ds) elides long values)."""
    out = [str(ds.TextValue)] if "TextValue" in ds else []
    for item in ds.get("ContentSequence", []):
        out.extend(_texts(item))
    return out


def _assert_same_patient_study(out: pydicom.Dataset, src: pydicom.Dataset) -> None:
    for kw in PATIENT_STUDY:
        assert str(out.get(kw, "")) == str(src.get(kw, "")), kw
    assert out.SeriesInstanceUID != src.SeriesInstanceUID


def _sc_inputs(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey ramp images and a heat disc in the upper-left quadrant of every slice."""
    yy, xx = np.mgrid[0:S, 0:S]
    images = np.repeat(((xx + yy) / (2 * S - 2))[None].astype(np.float32), k, axis=0)
    disc = np.exp(-((yy - 8) ** 2 + (xx - 8) ** 2) / (2 * 2.0**2)).astype(np.float32)
    heat = np.stack([disc * (1.0 + 0.5 * i) for i in range(k)])
    return images * 0.8 + 0.1, heat


# ---------------------------------------------------------------------------- SR


@pytest.mark.parametrize("verdict", ["abnormal", "normal", "not_assessable"])
def test_sr_reads_back_and_passes_dciodvfy(
    source: list[pydicom.Dataset], tmp_path: Path, verdict: str
) -> None:
    finding = _finding(source, verdict)
    sr = build_sr(source, finding, ALGO, uid_key=f"series/1/{verdict}", content_datetime=WHEN)
    back = _roundtrip(sr, tmp_path / "sr.dcm")
    warnings = _dciodvfy(tmp_path / "sr.dcm")
    assert not warnings, warnings  # standard codes only: the SR is warning-free

    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert back.Modality == "SR"
    _assert_same_patient_study(back, source[0])
    label = verdict.replace("_", " ").upper()
    assert back.SeriesDescription == f"AI TRIAGE REPORT: {label}"
    assert back.CompletionFlag == "COMPLETE" and back.VerificationFlag == "UNVERIFIED"
    # every source image is listed as evidence, so the PACS can link report and series
    evidence = {
        str(item.ReferencedSOPInstanceUID)
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {str(ds.SOPInstanceUID) for ds in source}

    parsed = hd.sr.srread(io.BytesIO((tmp_path / "sr.dcm").read_bytes()))
    report = parsed.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_image_measurement_groups()
    assert len(groups) == 1 + len(finding.top_slices)
    (verdict_eval,) = groups[0].get_qualitative_evaluations(name=VERDICT)
    assert verdict_eval.value == VERDICT_CODES[verdict]
    (priority_eval,) = groups[0].get_qualitative_evaluations(name=PRIORITY)
    assert priority_eval.value == PRIORITY_CODES[finding.priority]
    (threshold,) = groups[0].get_measurements(name=THRESHOLD)
    assert threshold.value == pytest.approx(finding.threshold)
    scores = groups[0].get_measurements(name=SCORE)
    if finding.score is None:
        assert scores == []
        assert f"Reason: {finding.reason}" in _texts(back)
    else:
        assert [m.value for m in scores] == [pytest.approx(finding.score)]


def test_sr_references_top_slices_in_order_with_their_scores(
    source: list[pydicom.Dataset], tmp_path: Path
) -> None:
    finding = _finding(source)
    sr = build_sr(source, finding, ALGO, uid_key="series/1/w", content_datetime=WHEN)
    _roundtrip(sr, tmp_path / "sr.dcm")
    report = hd.sr.srread(tmp_path / "sr.dcm").content
    slice_groups = report.get_image_measurement_groups()[1:]
    got = []
    for group in slice_groups:
        (m,) = group.get_measurements(name=SCORE)
        (ref,) = m.referenced_images
        uid = str(ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        assert [str(s.referenced_sop_instance_uid) for s in group.source_images] == [uid]
        got.append((uid, m.value))
    assert [u for u, _ in got] == [u for u, _ in finding.top_slices]
    assert [v for _, v in got] == pytest.approx([s for _, s in finding.top_slices])
    assert [g.tracking_identifier for g in slice_groups] == [
        f"Suspicious slice {i} of 3" for i in (1, 2, 3)
    ]


@pytest.mark.parametrize("verdict, threshold, expected", [
    # a normal series lists its highest-scoring slices, none of them suspicious
    ("normal", 5.0, ["Highest-scoring slice 1 of 3", "Highest-scoring slice 2 of 3",
                     "Highest-scoring slice 3 of 3"]),
    # an abnormal series calls suspicious only the slices at or above the threshold
    ("abnormal", 1.87, ["Suspicious slice 1 of 3", "Suspicious slice 2 of 3",
                        "Highest-scoring slice 3 of 3"]),
])
def test_sr_calls_suspicious_only_slices_at_or_above_the_threshold(
    source: list[pydicom.Dataset], tmp_path: Path, verdict: str, threshold: float,
    expected: list[str],
) -> None:
    finding = dataclasses.replace(_finding(source, verdict), threshold=threshold)
    sr = build_sr(source, finding, ALGO, uid_key="series/1/w", content_datetime=WHEN)
    _roundtrip(sr, tmp_path / "sr.dcm")
    groups = hd.sr.srread(tmp_path / "sr.dcm").content.get_image_measurement_groups()[1:]
    assert [g.tracking_identifier for g in groups] == expected
    assert _dciodvfy(tmp_path / "sr.dcm") == []


def test_sr_names_the_algorithm_and_weights(source: list[pydicom.Dataset], tmp_path: Path) -> None:
    sr = build_sr(source, _finding(source), ALGO, uid_key="series/1/w", content_datetime=WHEN)
    back = _roundtrip(sr, tmp_path / "sr.dcm")
    texts = _texts(back)
    # TID 4019 in each of the 4 groups (series + 3 slices), plus the device observer
    assert texts.count(ALGO.name) >= 4 and texts.count(ALGO.version) >= 4
    assert f"weights_sha256={ALGO.weights_sha256}" in texts
    assert back.Manufacturer == ALGO.manufacturer and back.SoftwareVersions == ALGO.version
    (observer,) = hd.sr.srread(tmp_path / "sr.dcm").content.get_observer_contexts()
    attrs = observer.observer_identifying_attributes
    assert attrs.name == ALGO.name and attrs.manufacturer_name == ALGO.manufacturer
    assert ALGO.version in attrs.model_name


def test_sr_uids_are_deterministic_and_keyed(source: list[pydicom.Dataset]) -> None:
    finding = _finding(source)
    a = build_sr(source, finding, ALGO, uid_key="s/1/w", content_datetime=WHEN)
    b = build_sr(source[::-1], finding, ALGO, uid_key="s/1/w", content_datetime=WHEN)
    c = build_sr(source, finding, ALGO, uid_key="s/2/w", content_datetime=WHEN)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert a.SOPInstanceUID != c.SOPInstanceUID and a.SeriesInstanceUID != c.SeriesInstanceUID
    # a retry is the same object down to the bytes (same content date given)
    bufs = []
    for ds in (a, b):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        bufs.append(buf.getvalue())
    assert bufs[0] == bufs[1]
    assert derive_uid("x", "y") == derive_uid("x", "y") != derive_uid("x", "z")


def test_superseding_sr_references_the_earlier_one(
    source: list[pydicom.Dataset], tmp_path: Path
) -> None:
    early = build_sr(
        source,
        _finding(source, "not_assessable"),
        ALGO,
        uid_key="s/1/w",
        content_datetime=WHEN,
    )
    early = _roundtrip(early, tmp_path / "early.dcm")
    late = build_sr(
        source, _finding(source), ALGO, uid_key="s/2/w", supersedes=early, content_datetime=WHEN
    )
    back = _roundtrip(late, tmp_path / "late.dcm")
    _dciodvfy(tmp_path / "late.dcm")
    assert back.SOPInstanceUID != early.SOPInstanceUID
    (study,) = back.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == source[0].StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == early.SeriesInstanceUID
    assert [str(i.ReferencedSOPInstanceUID) for i in series.ReferencedSOPSequence] == [
        str(early.SOPInstanceUID)
    ]
    assert f"Supersedes AI triage report {early.SOPInstanceUID}" in _texts(back)
    with pytest.raises(OutputError, match="different uid_key"):
        build_sr(source, _finding(source), ALGO, uid_key="s/1/w", supersedes=early)


def test_sr_site_priority_band_uses_declared_private_code(
    source: list[pydicom.Dataset], tmp_path: Path
) -> None:
    finding = replace(_finding(source), priority="Stroke team")
    sr = build_sr(source, finding, ALGO, uid_key="s/1/w", content_datetime=WHEN)
    back = _roundtrip(sr, tmp_path / "sr.dcm")
    warnings = _dciodvfy(tmp_path / "sr.dcm")
    assert all(PRIVATE_SCHEME in w for w in warnings)  # "unrecognized defined term" only
    assert PRIVATE_SCHEME in [
        i.CodingSchemeDesignator for i in back.CodingSchemeIdentificationSequence
    ]
    group = hd.sr.srread(tmp_path / "sr.dcm").content.get_image_measurement_groups()[0]
    (priority,) = group.get_qualitative_evaluations(name=PRIORITY)
    assert priority.value.scheme_designator == PRIVATE_SCHEME
    assert priority.value.meaning == "Stroke team"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"verdict": "maybe"}, "verdict"),
        ({"score": None}, "score is required"),
        ({"top_slices": [("1.2.3.4", 1.0)]}, "not in the source"),
        ({"score": float("nan")}, "finite"),
        ({"threshold": None}, "threshold"),
    ],
)
def test_sr_rejects_inconsistent_findings(
    source: list[pydicom.Dataset], change: dict, message: str
) -> None:
    with pytest.raises(OutputError, match=message):
        build_sr(source, replace(_finding(source), **change), ALGO, uid_key="k")


def test_outputs_refuse_mixed_studies(source: list[pydicom.Dataset]) -> None:
    other = copy.deepcopy(source[0])
    other.StudyInstanceUID = "1.2.3.4.5"
    with pytest.raises(OutputError, match="studies"):
        build_sr([*source, other], _finding(source), ALGO, uid_key="k")


# ---------------------------------------------------------------------------- SC


def test_sc_reads_back_and_passes_dciodvfy(source: list[pydicom.Dataset], tmp_path: Path) -> None:
    finding = _finding(source)
    images, heat = _sc_inputs(3)
    scs = build_sc_series(
        source, finding, ALGO, images, heat, uid_key="s/1/w", out_size=128, content_datetime=WHEN
    )
    assert len(scs) == 3
    for rank, (sc, (uid, _)) in enumerate(zip(scs, finding.top_slices, strict=True), start=1):
        path = tmp_path / f"sc{rank}.dcm"
        back = _roundtrip(sc, path)
        assert not _dciodvfy(path)
        assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
        assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
        assert back.BurnedInAnnotation == "YES"
        assert back.SeriesDescription == "AI TRIAGE ABNORMAL 1.73"
        assert back.InstanceNumber == rank
        _assert_same_patient_study(back, source[0])
        assert back.PatientName == CANARY_NAME and back.PatientID == CANARY_ID
        assert str(back.ReferencedImageSequence[0].ReferencedSOPInstanceUID) == uid
        assert str(back.SourceImageSequence[0].ReferencedSOPInstanceUID) == uid
        assert back.pixel_array.shape == (128 + banner_height(128), 128, 3)
        img = hd.imread(path)
        assert img.SOPInstanceUID == sc.SOPInstanceUID
        assert {s.SeriesInstanceUID for s in scs} == {back.SeriesInstanceUID}


def test_sc_banner_is_burned_in(source: list[pydicom.Dataset]) -> None:
    images, heat = _sc_inputs(1)
    kw = {"heat_max": 1.0, "out_size": 128}
    plain = render_overlay(images[0], heat[0], lines=("",), **kw)
    text = render_overlay(images[0], heat[0], lines=("AI TRIAGE - NOT FOR DIAGNOSIS", "X"), **kw)
    h = banner_height(128)
    assert np.array_equal(plain[h:], text[h:])  # the text does not touch the image
    banner = text[:h].reshape(-1, 3).astype(int)
    changed = np.any(text[:h] != plain[:h], axis=-1)
    assert changed.mean() > 0.03  # glyphs were drawn...
    amber = np.all(np.abs(banner - np.array(BANNER_WARN)) < 40, axis=-1)
    assert amber.sum() > 50  # ...in the warning colour
    assert not np.array_equal(text[:h], text[h : 2 * h])  # banner differs from the image


def test_sc_heat_colours_only_inside_heat_region() -> None:
    images, heat = _sc_inputs(1)
    rgb = render_overlay(images[0], heat[0], heat_max=1.0, out_size=128, heat_floor=0.2)
    body = rgb[banner_height(128) :].astype(int)
    coloured = (body.max(axis=-1) - body.min(axis=-1)) > 6
    heat_up = np.kron(heat[0], np.ones((4, 4)))  # same grid as the 128-pixel body
    assert coloured[heat_up > 0.5].mean() > 0.95  # the hot spot is coloured
    assert not coloured[heat_up < 0.1].any()  # everywhere else stays grey
    assert coloured[:64, :64].sum() > 0 and not coloured[64:, 64:].any()


def test_sc_uids_deterministic_and_keyed(source: list[pydicom.Dataset]) -> None:
    finding = _finding(source)
    images, heat = _sc_inputs(3)
    kw = {"out_size": 64, "content_datetime": WHEN}
    a = build_sc_series(source, finding, ALGO, images, heat, uid_key="s/1/w", **kw)
    b = build_sc_series(source[::-1], finding, ALGO, images, heat, uid_key="s/1/w", **kw)
    c = build_sc_series(source, finding, ALGO, images, heat, uid_key="s/2/w", **kw)
    assert [x.SOPInstanceUID for x in a] == [x.SOPInstanceUID for x in b]
    assert a[0].SeriesInstanceUID == b[0].SeriesInstanceUID
    assert not {x.SOPInstanceUID for x in a} & {x.SOPInstanceUID for x in c}
    assert a[0].SeriesInstanceUID != c[0].SeriesInstanceUID
    assert len({x.SOPInstanceUID for x in a}) == 3
    assert a[0].PixelData == b[0].PixelData


def test_sc_inputs_are_checked(source: list[pydicom.Dataset]) -> None:
    finding = _finding(source)
    images, heat = _sc_inputs(2)
    with pytest.raises(OutputError, match="2 images for 3 top slices"):
        build_sc_series(source, finding, ALGO, images, heat, uid_key="k")
    with pytest.raises(OutputError, match="template"):
        build_sc_series(
            source, finding, ALGO, *_sc_inputs(3), uid_key="k", series_description="{nope}"
        )
    empty = np.zeros((0, S, S), np.float32)
    assert (
        build_sc_series(source, _finding(source, "not_assessable"), ALGO, empty, empty, uid_key="k")
        == []
    )


def test_sc_realistic_example(source: list[pydicom.Dataset], tmp_path: Path) -> None:
    """A synthetic haemorrhage with its smoothed lesion mask as heat map: the picture in the
    README. The lesion must be coloured and the brain away from it must stay grey."""
    from scipy import ndimage as ndi
    from triage_model.synth import make_case

    from triage_agent.preprocess import model_inputs, volume_from_case

    case = make_case(5, "intraparenchymal_haemorrhage", subtle=False, matrix=256)
    mi = model_inputs(volume_from_case(case), lesion_mask=case.lesion_mask)
    assert mi.lesion is not None
    k = int(mi.lesion.sum(axis=(1, 2)).argmax())
    heat = ndi.gaussian_filter(mi.lesion[k].astype(np.float32), 2.0)[None]
    finding = replace(_finding(source), top_slices=_finding(source).top_slices[:1])
    (sc,) = build_sc_series(
        source,
        finding,
        ALGO,
        mi.x[k][None],
        heat,
        uid_key="docs",
        pixel_spacing_mm=mi.pixel_mm,
        content_datetime=WHEN,
    )
    rgb = sc.pixel_array
    body = rgb[banner_height(512) :].astype(int)
    coloured = (body.max(axis=-1) - body.min(axis=-1)) > 6
    lesion_up = ndi.zoom(mi.lesion[k].astype(np.float32), 4, order=0) > 0.5
    assert coloured[lesion_up].mean() > 0.9
    far = ~ndi.binary_dilation(lesion_up, iterations=40)
    assert coloured[far].mean() < 0.001

    from PIL import Image

    out = tmp_path / "sc_example.png"
    Image.fromarray(rgb).save(out)
    if os.environ.get("TRIAGE_WRITE_DOCS") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        Image.fromarray(rgb).save(REPO / "docs" / "sc_example.png", optimize=True)
