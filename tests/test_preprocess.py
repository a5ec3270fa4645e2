"""DICOM series -> HU volume -> model inputs: ordering, rescale, orientation, masks, errors."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from triage_model.synth import SynthCase, make_case

from triage_agent.preprocess import (
    HUVolume,
    PreprocessError,
    model_inputs,
    read_series,
    volume_from_case,
)
from triage_agent.synth_dicom import write_case_dicom


@pytest.fixture(scope="module")
def case() -> SynthCase:
    # 512 matrix: the real size, and non-isotropic (thick slices, ~0.45 mm pixels)
    return make_case(31, "intraparenchymal_haemorrhage", subtle=False, matrix=512)


@pytest.fixture(scope="module")
def series(case: SynthCase, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("series")
    return write_case_dicom(
        case, out, patient_name="T^T", patient_id="T", encoding="unsigned_half", write_mask=False
    )


def _shuffled(paths: list[Path], seed: int = 0) -> list[Path]:
    p = list(paths)
    random.Random(seed).shuffle(p)
    return p


def test_read_series_shuffled_rescaled_roundtrip(case: SynthCase, series: list[Path]) -> None:
    ds = pydicom.dcmread(series[0], stop_before_pixels=True)
    assert float(ds.RescaleSlope) == 0.5 and ds.PixelRepresentation == 0
    t = time.perf_counter()
    vol = read_series(_shuffled(series))
    read_s = time.perf_counter() - t
    assert vol.hu.shape == case.hu.shape
    assert np.allclose(vol.hu, case.hu, atol=0.25 + 1e-3)  # half of the 0.5 HU slope
    assert vol.spacing_mm == pytest.approx(case.spacing_mm, abs=1e-3)
    assert vol.spacing_mm[0] > 2 * vol.spacing_mm[1]  # non-isotropic
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series]
    assert vol.sop_instance_uids == uids  # ordered inferior -> superior like the writer
    assert vol.series_instance_uid == str(ds.SeriesInstanceUID)
    assert read_s < 10


@pytest.mark.parametrize("encoding", ["signed", "unsigned12", "signed_hu"])
def test_other_encodings(tmp_path: Path, encoding: str) -> None:
    c = make_case(32, "normal", matrix=128)
    paths = write_case_dicom(c, tmp_path, patient_name="A^B", patient_id="1",
                             encoding=encoding, write_mask=False)  # fmt: skip
    vol = read_series(_shuffled(paths, 1))
    assert np.allclose(vol.hu, c.hu, atol=0.5 + 1e-3)


def _rewrite_flipped(src: list[Path], dst: Path) -> list[Path]:
    """Same volume stored superior->inferior with rows bottom-up and columns left->right."""
    dst.mkdir()
    out = []
    for p in src:
        ds = pydicom.dcmread(p)
        arr = ds.pixel_array[::-1, ::-1]
        rows, cols = arr.shape
        sy, sx = (float(v) for v in ds.PixelSpacing)
        x0, y0, z0 = (float(v) for v in ds.ImagePositionPatient)
        ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
        ds.ImagePositionPatient = [x0 + (cols - 1) * sx, y0 + (rows - 1) * sy, z0]
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
        q = dst / p.name
        ds.save_as(q, enforce_file_format=True)
        out.append(q)
    return out


def test_orientation_flips_are_undone(tmp_path: Path) -> None:
    c = make_case(33, "epidural_haematoma", subtle=False, matrix=128)
    paths = write_case_dicom(c, tmp_path / "a", patient_name="A^B", patient_id="1",
                             write_mask=False)  # fmt: skip
    flipped = _rewrite_flipped(paths, tmp_path / "b")
    vol = read_series(_shuffled(flipped, 2))
    assert np.allclose(vol.hu, c.hu, atol=0.5 + 1e-3)


def test_volume_from_case(case: SynthCase) -> None:
    vol = volume_from_case(case)
    assert isinstance(vol, HUVolume)
    assert vol.hu.shape == case.hu.shape and vol.sop_instance_uids == [None] * case.hu.shape[0]
    assert vol.spacing_mm == case.spacing_mm


def test_model_inputs_lesion_brain_and_speed(case: SynthCase) -> None:
    vol = volume_from_case(case)
    model_inputs(vol)  # warm-up (imports, allocator)
    t = time.perf_counter()
    mi = model_inputs(vol, size=128, lesion_mask=case.lesion_mask)
    elapsed = time.perf_counter() - t
    n = len(mi.slice_index)
    assert mi.x.shape == mi.brain.shape == mi.lesion.shape == (n, 128, 128)
    assert mi.x.dtype == np.float32 and mi.x.min() >= 0.0 and mi.x.max() <= 1.0
    assert np.all(np.diff(mi.slice_index) > 0)
    assert 10 <= n <= case.hu.shape[0]
    # lesion lands on the right slices: every model slice with lesion has lesion in the source,
    # and the slice with the largest lesion area is the same
    src_area = case.lesion_mask.sum(axis=(1, 2))
    mi_area = mi.lesion.sum(axis=(1, 2))
    assert mi_area.sum() > 0
    assert np.all(src_area[mi.slice_index[mi_area > 0]] > 0)
    assert mi.slice_index[np.argmax(mi_area)] == int(np.argmax(src_area))
    # the lesion is bright (blood) in the windowed input
    assert np.median(mi.x[mi.lesion]) > 0.6
    # brain mask: brain, not skull or scalp or air
    hu_in = mi.hu[mi.brain]
    assert np.mean(hu_in > 150) < 0.005 and np.mean(hu_in < -50) < 0.005
    assert 15 < np.median(hu_in) < 50
    mid = n // 2
    assert mi.brain[mid].mean() > 0.25
    assert not mi.brain[:, 0, :].any() and not mi.brain[:, :, 0].any()
    assert mi.lesion[mi.lesion].size <= (mi.lesion & mi.brain).sum() * 1.5 + 10
    # a 512 series in well under a couple of seconds (generous on a shared CPU)
    assert elapsed < 3.0, elapsed


def test_model_inputs_head_centred(case: SynthCase) -> None:
    """Shifting the head in the scanner field of view does not move it in the model input."""
    vol = volume_from_case(case)
    shifted = HUVolume(np.roll(vol.hu, (0, 25, -30), axis=(0, 1, 2)), vol.spacing_mm,
                       vol.sop_instance_uids)  # fmt: skip
    a = model_inputs(vol)
    b = model_inputs(shifted)
    common, ia, ib = np.intersect1d(a.slice_index, b.slice_index, return_indices=True)
    assert len(common) >= 0.9 * max(len(a.slice_index), len(b.slice_index))
    assert np.mean(np.abs(a.x[ia] - b.x[ib])) < 0.02
    inter = (a.brain[ia] & b.brain[ib]).sum()
    assert inter / max(a.brain[ia].sum(), 1) > 0.9


def test_model_inputs_errors() -> None:
    blank = HUVolume(np.full((5, 64, 64), -1000.0, np.float32), (5.0, 1.0, 1.0), [None] * 5)
    with pytest.raises(PreprocessError, match="no head"):
        model_inputs(blank)
    water = np.full((5, 64, 64), -1000.0, np.float32)
    water[:, 20:40, 20:40] = 0.0  # a small phantom, no brain-sized slice
    with pytest.raises(PreprocessError, match="brain"):
        model_inputs(HUVolume(water, (5.0, 1.0, 1.0), [None] * 5), min_brain_fraction=0.5)
    with pytest.raises(PreprocessError, match="lesion mask shape"):
        model_inputs(HUVolume(water, (5.0, 1.0, 1.0), [None] * 5),
                     lesion_mask=np.zeros((4, 64, 64), bool))  # fmt: skip


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    root = tmp_path_factory.mktemp("small")
    a = write_case_dicom(make_case(41, "normal", matrix=64), root / "a", patient_name="A^B",
                         patient_id="1", write_mask=False)  # fmt: skip
    b = write_case_dicom(make_case(42, "normal", matrix=64), root / "b", patient_name="A^B",
                         patient_id="1", write_mask=False)  # fmt: skip
    return a, b


def test_single_file_rejected(small_series: tuple[list[Path], list[Path]]) -> None:
    with pytest.raises(PreprocessError, match="at least 2 slices"):
        read_series(small_series[0][:1])
    with pytest.raises(PreprocessError, match="at least 2 slices"):
        read_series([])


def test_mixed_series_rejected(small_series: tuple[list[Path], list[Path]]) -> None:
    a, b = small_series
    with pytest.raises(PreprocessError, match="different series"):
        read_series(a[:5] + b[:5])


def test_missing_pixel_data_rejected(
    small_series: tuple[list[Path], list[Path]], tmp_path: Path
) -> None:
    paths = list(small_series[0])
    ds = pydicom.dcmread(paths[3])
    del ds.PixelData
    broken = tmp_path / "nopix.dcm"
    ds.save_as(broken, enforce_file_format=True)
    paths[3] = broken
    with pytest.raises(PreprocessError, match="pixels: .*no pixel data"):
        read_series(paths)


def test_gap_and_duplicate_rejected(small_series: tuple[list[Path], list[Path]]) -> None:
    a = small_series[0]
    with pytest.raises(PreprocessError, match="non-uniform slice spacing"):
        read_series(a[:5] + a[6:])
    with pytest.raises(PreprocessError, match="same position"):
        read_series(a[:5] + a[4:5])


def test_not_dicom_rejected(tmp_path: Path, small_series: tuple[list[Path], list[Path]]) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all")
    with pytest.raises(PreprocessError, match="not a readable DICOM"):
        read_series([*small_series[0][:3], junk])


def test_non_axial_rejected(tmp_path: Path, small_series: tuple[list[Path], list[Path]]) -> None:
    out = []
    for i, p in enumerate(small_series[0][:4]):
        ds = pydicom.dcmread(p)
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
        ds.ImagePositionPatient = [float(i) * 3.0, 0.0, 0.0]
        q = tmp_path / p.name
        ds.save_as(q, enforce_file_format=True)
        out.append(q)
    with pytest.raises(PreprocessError, match="not an axial series"):
        read_series(out)
