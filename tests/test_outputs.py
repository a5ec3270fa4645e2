"""SR and secondary-capture writers: what a PACS and a radiologist would see.

Every object is written to bytes and read back with pydicom and highdicom, and checked by
``dciodvfy`` (dicom3tools), because an object a PACS rejects or a viewer misreads helps no one.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import subprocess
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from triage_model.synth import SynthCase

from tests.conftest import require_tool
from tests.factories import CANARY_ID, CANARY_NAME, make_series
from triage_agent.outputs.common import AlgorithmInfo, OutputError, TriageFinding, derive_uid
from triage_agent.outputs.sc import (
    AXIAL_LPS,
    BANNER_WARN,
    TAG_HIGHEST,
    TAG_SUSPICIOUS,
    banner_height,
    build_sc_series,
    edge_letters,
    marker_box,
    patient_orientation,
    render_overlay,
)
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
    # ranked by score, each naming where its slice lies (image number and table position)
    assert [g.tracking_identifier for g in slice_groups] == [
        "Suspicious slice 1 of 3: image 13, z 60.0 mm",
        "Suspicious slice 2 of 3: image 12, z 55.0 mm",
        "Suspicious slice 3 of 3: image 14, z 65.0 mm",
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
    assert [g.tracking_identifier.split(":")[0] for g in groups] == expected
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

FLIPPED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # columns towards the patient's right


def _bright(rgb: np.ndarray) -> np.ndarray:
    """Pixels of the near-white marker letters."""
    return np.all(rgb >= 200, axis=-1)


def _glyph(body: np.ndarray, edge: str) -> np.ndarray:
    """The bright pixels of the marker at ``edge``, cropped to their bounding box."""
    rows, cols = marker_box(body.shape[1], edge)
    mask = _bright(body[rows, cols])
    assert mask.sum() > 20, f"no marker at the {edge} edge"
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _is_r(glyph: np.ndarray) -> bool:
    """"R" has its bowl in the top-right quarter; "L" leaves that quarter empty."""
    h, w = glyph.shape
    return bool(glyph[: h // 3, w // 2 :].mean() > 0.15)


@pytest.mark.parametrize(
    ("overlay", "orientation", "expected"),
    [("outline", AXIAL_LPS, ["L", "P"]), ("blend", FLIPPED, ["R", "P"])],
)
def test_sc_reads_back_and_passes_dciodvfy(
    source: list[pydicom.Dataset],
    tmp_path: Path,
    overlay: str,
    orientation: tuple[float, ...],
    expected: list[str],
) -> None:
    finding = _finding(source)
    images, heat = _sc_inputs(3)
    scs = build_sc_series(
        source, finding, ALGO, images, heat, uid_key="s/1/w", out_size=128, content_datetime=WHEN,
        overlay=overlay, orientation=orientation,
    )  # fmt: skip
    assert len(scs) == 3
    top_uids = {uid for uid, _ in finding.top_slices}
    for number, sc in enumerate(scs, start=1):
        path = tmp_path / f"sc{number}.dcm"
        back = _roundtrip(sc, path)
        assert _dciodvfy(path) == []  # 0 errors, 0 warnings
        assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
        assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
        assert back.BurnedInAnnotation == "YES"
        assert back.SeriesDescription == "AI TRIAGE ABNORMAL 1.73"
        assert back.InstanceNumber == number
        assert list(back.PatientOrientation) == expected
        _assert_same_patient_study(back, source[0])
        assert back.PatientName == CANARY_NAME and back.PatientID == CANARY_ID
        uid = str(back.ReferencedImageSequence[0].ReferencedSOPInstanceUID)
        assert uid in top_uids
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


def test_sc_blend_colours_only_inside_heat_region() -> None:
    images, heat = _sc_inputs(1)
    rgb = render_overlay(
        images[0], heat[0], heat_max=1.0, out_size=128, heat_floor=0.2, overlay="blend",
        opacity=0.45,
    )  # fmt: skip
    body = rgb[banner_height(128) :].astype(int)
    coloured = (body.max(axis=-1) - body.min(axis=-1)) > 6
    heat_up = np.kron(heat[0], np.ones((4, 4)))  # same grid as the 128-pixel body
    assert coloured[heat_up > 0.5].mean() > 0.95  # the hot spot is coloured
    assert not coloured[heat_up < 0.1].any()  # everywhere else stays grey
    assert coloured[:64, :64].sum() > 0 and not coloured[64:, 64:].any()


@pytest.mark.parametrize("size", [128, 512])
def test_sc_markers_follow_the_orientation(size: int) -> None:
    """R on the viewer's left for the usual axial grid, L there when the columns run towards
    the patient's right; A at the top, P at the bottom; legible letters at both sizes."""
    dark = np.zeros((S, S), np.float32)
    h = banner_height(size)
    std = render_overlay(dark, dark, heat_max=1.0, out_size=size)[h:]
    flip = render_overlay(dark, dark, heat_max=1.0, out_size=size, orientation=FLIPPED)[h:]
    bare = render_overlay(dark, dark, heat_max=1.0, out_size=size, orientation=None)[h:]
    assert not _bright(bare).any()  # without an orientation, nothing is written
    for edge in ("left", "right", "top", "bottom"):
        rows, cols = marker_box(size, edge)
        inside = np.zeros(std.shape[:2], bool)
        inside[rows, cols] = True
        assert _bright(std)[inside].sum() > 2 * (size // 64) ** 2  # a letter, not a speck
    assert not _bright(std)[~_union_of_boxes(size)].any()  # and nothing elsewhere
    assert _is_r(_glyph(std, "left")) and not _is_r(_glyph(std, "right"))
    assert not _is_r(_glyph(flip, "left")) and _is_r(_glyph(flip, "right"))
    assert np.array_equal(_glyph(std, "left"), _glyph(flip, "right"))  # the same "R"
    for edge in ("top", "bottom"):
        assert np.array_equal(_glyph(std, edge), _glyph(flip, edge))
    assert edge_letters(AXIAL_LPS) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert edge_letters(FLIPPED) == {"left": "L", "right": "R", "top": "A", "bottom": "P"}
    assert patient_orientation(AXIAL_LPS) == ("L", "P")
    assert patient_orientation([0, 1, 0, 0, 0, -1]) == ("P", "F")  # a sagittal image


def _union_of_boxes(size: int) -> np.ndarray:
    out = np.zeros((size, size), bool)
    for edge in ("left", "right", "top", "bottom"):
        out[marker_box(size, edge)] = True
    return out


def _case_series(tmp_path: Path, flip_columns: bool) -> tuple[list[Path], SynthCase]:
    """A synthetic head with a haemorrhage written as an axial series; with ``flip_columns``
    stored with ImageOrientationPatient [-1, 0, 0, 0, 1, 0] (columns towards the right)."""
    from triage_model.synth import make_case

    from triage_agent.synth_dicom import write_case_dicom

    case = make_case(5, "intraparenchymal_haemorrhage", subtle=False, matrix=128)
    paths = write_case_dicom(case, tmp_path / "std", write_mask=False, encoding="signed")
    if not flip_columns:
        return paths, case
    out = []
    (tmp_path / "flip").mkdir()
    for p in paths:
        ds = pydicom.dcmread(p)
        arr = ds.pixel_array[:, ::-1]
        x0, y0, z0 = (float(v) for v in ds.ImagePositionPatient)
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [x0 + (arr.shape[1] - 1) * float(ds.PixelSpacing[1]), y0, z0]
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
        q = tmp_path / "flip" / p.name
        ds.save_as(q, enforce_file_format=True)
        out.append(q)
    return out, case


@pytest.mark.parametrize("flip_columns", [False, True])
def test_sc_r_marker_is_on_the_patients_right(tmp_path: Path, flip_columns: bool) -> None:
    """The haemorrhage lies in the patient's right hemisphere: whether the scanner stored the
    series as usual or mirrored, the outline is drawn on the side of the "R" marker."""
    from scipy import ndimage as ndi

    from triage_agent.preprocess import model_inputs, read_series

    paths, case = _case_series(tmp_path, flip_columns)
    # LPS x grows towards the patient's left: the lesion is on the right at low x
    xs = np.nonzero(case.lesion_mask)[2]
    assert xs.mean() < case.lesion_mask.shape[2] / 2 - 5
    vol = read_series(paths)
    mi = model_inputs(vol, size=64, lesion_mask=case.lesion_mask)
    assert mi.lesion is not None
    k = int(mi.lesion.sum(axis=(1, 2)).argmax())
    uid = vol.sop_instance_uids[int(mi.slice_index[k])]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    finding = TriageFinding("abnormal", 3.0, 1.0, "urgent", None, [(str(uid), 3.0)])
    heat = ndi.gaussian_filter(mi.lesion[k].astype(np.float32), 1.0)[None]
    (sc,) = build_sc_series(
        headers, finding, ALGO, mi.x[k][None], heat, uid_key="lr", out_size=256,
        overlay="outline", opacity=0.0, content_datetime=WHEN,
    )  # fmt: skip
    body = sc.pixel_array[banner_height(256) :]
    line = np.all(np.abs(body.astype(int) - _line_colour()) < 8, axis=-1)
    line[:, :8] = line[:, -8:] = False  # not the frame
    assert line.sum() > 30
    r_on_left = _is_r(_glyph(body, "left"))
    assert r_on_left and not _is_r(_glyph(body, "right"))
    assert np.nonzero(line)[1].mean() < 128  # the outline is on the "R" (left) half


def _line_colour() -> np.ndarray:
    import matplotlib

    return np.round(np.asarray(matplotlib.colormaps["inferno"](0.85)[:3]) * 255).astype(int)


def test_sc_outline_keeps_the_density_visible() -> None:
    """Inside the outlined region the CT keeps its grey level: exactly with no tint, and in
    brightness (Rec. 709 luminance) with the default tint; the line runs just outside."""
    yy, xx = np.mgrid[0:S, 0:S]
    ct = (0.3 + 0.4 * (xx + yy) / (2 * S - 2)).astype(np.float32)  # mid greys: no clipping
    _, heat = _sc_inputs(1)
    h = banner_height(128)
    bare = render_overlay(ct, np.zeros_like(ct), heat_max=1.0, out_size=128)[h:].astype(int)
    pure = render_overlay(ct, heat[0], heat_max=1.0, out_size=128, opacity=0.0)[h:].astype(int)
    tinted = render_overlay(ct, heat[0], heat_max=1.0, out_size=128)[h:].astype(int)  # default
    region = np.kron(heat[0], np.ones((4, 4))) > 0.35  # well inside the region above 0.2
    assert region.sum() > 100
    assert np.array_equal(pure[region], bare[region])  # the windowed CT, not the colour
    luma = np.array([0.2126, 0.7152, 0.0722])
    assert np.abs(tinted[region] @ luma - bare[region] @ luma).max() <= 2.0
    assert np.abs(tinted[region] - bare[region]).max() > 10  # yet visibly tinted
    changed = np.any(pure != bare, axis=-1)  # the outline, and nothing else
    outline = np.kron(heat[0], np.ones((4, 4)))
    assert changed.sum() > 40
    assert outline[changed].max() < 0.35 and not changed[region].any()


def test_sc_opacity_changes_the_blend() -> None:
    images, heat = _sc_inputs(1)
    h = banner_height(128)
    bare = render_overlay(images[0], np.zeros_like(heat[0]), heat_max=1.0, out_size=128)[h:]
    region = np.kron(heat[0], np.ones((4, 4))) > 0.5

    def shift(overlay: str, opacity: float) -> float:
        rgb = render_overlay(
            images[0], heat[0], heat_max=1.0, out_size=128, overlay=overlay, opacity=opacity
        )[h:]
        return float(np.abs(rgb.astype(int) - bare.astype(int))[region].mean())

    for overlay in ("blend", "outline"):
        assert shift(overlay, 0.0) == 0.0
        assert 2 < shift(overlay, 0.2) < shift(overlay, 0.6) - 5
    with pytest.raises(OutputError, match="overlay"):
        render_overlay(images[0], heat[0], heat_max=1.0, overlay="glow")


@pytest.mark.parametrize(("verdict", "tag", "colour"), [
    ("abnormal", "MOST SUSPICIOUS", TAG_SUSPICIOUS), ("normal", "HIGHEST SCORE", TAG_HIGHEST),
])  # fmt: skip
def test_sc_images_follow_the_anatomy_and_the_top_one_is_marked(
    source: list[pydicom.Dataset], tmp_path: Path, verdict: str, tag: str, colour: tuple
) -> None:
    # ranked by score: slices at z 60, 55, 65 mm; shown from inferior to superior
    finding = _finding(source, verdict)
    scs = build_sc_series(
        source, finding, ALGO, *_sc_inputs(3), uid_key="s/1/w", out_size=128,
        content_datetime=WHEN,
    )  # fmt: skip
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source}
    refs = [str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) for sc in scs]
    z = [float(by_uid[u].ImagePositionPatient[2]) for u in refs]
    assert z == [55.0, 60.0, 65.0] and [sc.InstanceNumber for sc in scs] == [1, 2, 3]
    top = finding.top_slices[0][0]
    h = banner_height(128)
    for sc, uid in zip(scs, refs, strict=True):
        rgb = sc.pixel_array
        frame = np.all(rgb[h:][[0, -1]] == colour, axis=-1)  # top and bottom rows
        in_banner = np.all(rgb[:h] == colour, axis=-1).sum()
        if uid == top:
            assert frame.mean() > 0.95 and in_banner > 100  # frame and tag box
            assert tag in sc.ImageComments and "rank 1 of 3" in sc.ImageComments
        else:
            assert not frame.any() and in_banner == 0
            assert "MOST SUSPICIOUS" not in sc.ImageComments
            assert "HIGHEST SCORE" not in sc.ImageComments
        path = tmp_path / f"{uid}.dcm"
        _roundtrip(sc, path)
        assert _dciodvfy(path) == []


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
    with pytest.raises(OutputError, match="overlay"):
        build_sc_series(source, finding, ALGO, *_sc_inputs(3), uid_key="k", overlay="glow")
    with pytest.raises(OutputError, match="orientation"):
        build_sc_series(source, finding, ALGO, *_sc_inputs(3), uid_key="k", orientation=(1, 0))
    empty = np.zeros((0, S, S), np.float32)
    assert (
        build_sc_series(source, _finding(source, "not_assessable"), ALGO, empty, empty, uid_key="k")
        == []
    )


def test_sc_realistic_example(source: list[pydicom.Dataset], tmp_path: Path) -> None:
    """A synthetic haemorrhage with its smoothed lesion mask as heat map, in the default look
    (outline with a light tint): the lesion is outlined and tinted, the brain away from it
    stays grey."""
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
    far[:8] = far[-8:] = far[:, :8] = far[:, -8:] = False  # the frame of the top image
    assert coloured[far].mean() < 0.001


@pytest.mark.parametrize(("overlay", "opacity"), [("outline", 0.3), ("blend", 0.6)])
def test_published_heat_maps_follow_the_settings_most_suspicious_stored_first(
    tmp_path: Path, overlay: str, opacity: float
) -> None:
    """``[outputs] overlay``/``overlay_opacity`` reach the pictures; the heat maps are numbered
    from inferior to superior, and the most suspicious is stored first (the status page shows
    the first one as the series' thumbnail)."""
    from types import SimpleNamespace

    from triage_agent.config import AgentConfig, OutputsConfig
    from triage_agent.publish import build_outputs
    from triage_agent.storage import Storage

    paths = make_series(tmp_path / "src", n=12, seed=3, size=64)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    scores = [0.1 * i for i in range(12)]
    scores[4] = 9.0  # the most suspicious lies low in the head
    images, heat = _sc_inputs(12)
    result = SimpleNamespace(
        verdict="abnormal", score=9.0, threshold=1.0, reason=None,
        slices=list(zip(uids, scores, strict=True)), heatmaps=heat,
        model_input=SimpleNamespace(x=images, pixel_mm=200 / S, yaw_rad=0.0),
    )  # fmt: skip
    model = SimpleNamespace(name=ALGO.name, version=ALGO.version,
                            weights_sha256=ALGO.weights_sha256)  # fmt: skip
    cfg = AgentConfig(outputs=OutputsConfig(overlay=overlay, overlay_opacity=opacity))
    outs = build_outputs(
        cfg=cfg, storage=Storage(tmp_path / "st"), source_paths=paths, result=result,
        model=model, uid_key="s/1/w", supersedes_path=None, priority="urgent",
        content_datetime=WHEN,
    )  # fmt: skip
    scs = [pydicom.dcmread(tmp_path / "st" / o.relpath) for o in outs if o.kind == "sc"]
    refs = [uids.index(str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)) for sc in scs]
    assert refs == [4, 8, 9, 10, 11]  # the top one, then the others foot to head
    assert [sc.InstanceNumber for sc in scs] == [1, 2, 3, 4, 5]
    assert "MOST SUSPICIOUS" in scs[0].ImageComments
    drawn = "outlined" if overlay == "outline" else "blended"
    assert all(f"({drawn}, inferno, fill opacity {opacity:.2f})" in sc.DerivationDescription
               for sc in scs)  # fmt: skip


def test_outputs_of_a_multi_frame_series_reference_frames(tmp_path: Path) -> None:
    """An enhanced (multi-frame) CT is one image: the SR and the heat maps name the frame of
    each top slice (ReferencedFrameNumber), its position comes from the frame's functional
    group, and every heat map is an instance of its own."""
    paths = make_series(tmp_path / "classic", n=12, seed=5, size=64)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths], series_instance_uid=hd.UID(), series_number=9,
        sop_instance_uid=hd.UID(), instance_number=1,
    )  # fmt: skip
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    uid = str(header.SOPInstanceUID)
    z_of = {
        i + 1: float(g.PlanePositionSequence[0].ImagePositionPatient[2])
        for i, g in enumerate(header.PerFrameFunctionalGroupsSequence)
    }
    frames = [7, 3, 9]  # ranked by score
    finding = TriageFinding(
        "abnormal", 2.0, 1.0, "urgent", None, [(uid, 2.0), (uid, 1.5), (uid, 1.2)], frames
    )
    sr = build_sr([header], finding, ALGO, uid_key="mf", content_datetime=WHEN)
    _roundtrip(sr, tmp_path / "sr.dcm")
    assert _dciodvfy(tmp_path / "sr.dcm") == []
    groups = hd.sr.srread(tmp_path / "sr.dcm").content.get_image_measurement_groups()[1:]
    got = []
    for group in groups:
        (m,) = group.get_measurements(name=SCORE)
        (ref,) = m.referenced_images
        got.append([int(f) for f in ref.referenced_frame_numbers])
        assert [[int(f) for f in s.referenced_frame_numbers] for s in group.source_images] == [
            got[-1]
        ]
    assert got == [[7], [3], [9]]
    assert groups[0].tracking_identifier == (
        f"Suspicious slice 1 of 3: frame 7, z {z_of[7]:.1f} mm"
    )

    scs = build_sc_series(
        [header], finding, ALGO, *_sc_inputs(3), uid_key="mf", out_size=128,
        content_datetime=WHEN,
    )  # fmt: skip
    assert len({sc.SOPInstanceUID for sc in scs}) == 3
    shown = [int(sc.SourceImageSequence[0].ReferencedFrameNumber) for sc in scs]
    assert [z_of[f] for f in shown] == sorted(z_of[f] for f in frames)  # foot to head
    for sc in scs:
        assert int(sc.ReferencedImageSequence[0].ReferencedFrameNumber) in frames
        _roundtrip(sc, tmp_path / "sc.dcm")
        assert _dciodvfy(tmp_path / "sc.dcm") == []
    # published: the most suspicious frame's heat map is stored first
    from types import SimpleNamespace

    from triage_agent.config import AgentConfig
    from triage_agent.publish import build_outputs
    from triage_agent.storage import Storage

    scores = [0.1 * i for i in range(12)]
    scores[5] = 9.0  # frame 6
    images, heat = _sc_inputs(12)
    result = SimpleNamespace(
        verdict="abnormal", score=9.0, threshold=1.0, reason=None,
        slices=[(uid, sc) for sc in scores], frames=list(range(1, 13)), heatmaps=heat,
        model_input=SimpleNamespace(x=images, pixel_mm=200 / S, yaw_rad=0.0),
    )  # fmt: skip
    model = SimpleNamespace(name=ALGO.name, version=ALGO.version,
                            weights_sha256=ALGO.weights_sha256)  # fmt: skip
    outs = build_outputs(
        cfg=AgentConfig(), storage=Storage(tmp_path / "st"), source_paths=[path], result=result,
        model=model, uid_key="mf/1", supersedes_path=None, priority="urgent",
        content_datetime=WHEN,
    )  # fmt: skip
    stored = [pydicom.dcmread(tmp_path / "st" / o.relpath) for o in outs if o.kind == "sc"]
    assert [int(sc.SourceImageSequence[0].ReferencedFrameNumber) for sc in stored][0] == 6
    assert "MOST SUSPICIOUS" in stored[0].ImageComments and len(stored) == 5
    with pytest.raises(OutputError, match="frame 99"):
        build_sr([header], replace(finding, top_frames=[99, 3, 9]), ALGO, uid_key="k")
    with pytest.raises(OutputError, match="same image"):
        build_sr([header], replace(finding, top_frames=[3, 3, 9]), ALGO, uid_key="k")


def test_earlier_heatmap_opacity_setting_still_loads(tmp_path: Path) -> None:
    """An agent.toml written for the earlier release (``heatmap_opacity``) keeps working; the
    default look is an outline with a light tint."""
    from triage_agent.config import OutputsConfig, load_config

    (tmp_path / "agent.toml").write_text("[outputs]\nheatmap_opacity = 0.5\n")
    cfg = load_config(tmp_path / "agent.toml")
    assert cfg.outputs.overlay_opacity == 0.5 and cfg.outputs.overlay == "outline"
    assert (OutputsConfig().overlay, OutputsConfig().overlay_opacity) == ("outline", 0.3)
