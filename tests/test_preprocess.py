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


# ------------------------------------------------------------------ site-independent steps


def _tilted_ball_series(tmp_path: Path, tilt: float = 18.0, th: float = 5.0, n: int = 30,
                        m: int = 96, ps: float = 2.0) -> list[Path]:
    """A 40 mm ball scanned with a tilted gantry, written as a scanner does (table along z)."""
    t = np.radians(tilt)
    v = (np.arange(m) - (m - 1) / 2.0) * ps  # row coordinate in the tilted plane
    u = (np.arange(m) - (m - 1) / 2.0) * ps
    c = (np.arange(n) - (n - 1) / 2.0) * th / np.cos(t)  # table position of each slice
    z = c[:, None, None] + v[None, :, None] * np.sin(t)
    y = np.broadcast_to(v[None, :, None] * np.cos(t), z.shape)
    x = u[None, None, :]
    hu = np.where((z - 5.0) ** 2 + (y + 15.0) ** 2 + (x - 10.0) ** 2 < 40.0**2, 1000.0, -1000.0)
    meta = {"gantry_tilt_deg": tilt, "thickness_mm": th,
            "origin_mm": [float(c[0] + v[0] * np.sin(t)), float(v[0] * np.cos(t)), float(u[0])]}
    case = SynthCase(hu=hu.astype(np.float32), spacing_mm=(th, ps, ps), lesion_mask=hu > 0,
                     label="normal", subtle=False, seed=77, meta=meta)
    return write_case_dicom(case, tmp_path, write_mask=False, encoding="signed_hu")


def _ball_centres(hu: np.ndarray) -> np.ndarray:
    out = []
    for sl in hu:
        ys, xs = np.nonzero(sl > 0)
        if len(ys) > 300:  # not the caps, which interpolation between 5 mm slices blurs
            out.append((ys.mean(), xs.mean()))
    return np.array(out)


def test_tilt_correction_puts_a_ball_back_on_one_axis(tmp_path: Path) -> None:
    from triage_agent.preprocess import correct_tilt

    vol = read_series(_shuffled(_tilted_ball_series(tmp_path), 3))
    assert vol.affine_zyx is not None
    before = _ball_centres(vol.hu)
    # read as if orthogonal, the ball's sections drift 5 mm * tan(18 deg) / 2 mm per slice
    drift = np.polyfit(np.arange(len(before)), before[:, 0], 1)[0]
    assert abs(drift) == pytest.approx(5.0 * np.tan(np.radians(18.0)) / 2.0, rel=0.1)
    fixed, _, src = correct_tilt(vol)
    assert fixed.affine_zyx is None
    assert fixed.spacing_mm == pytest.approx(vol.spacing_mm)
    after = _ball_centres(fixed.hu)
    assert len(after) >= 10
    assert np.ptp(after[:, 0]) < 0.6 and np.ptp(after[:, 1]) < 0.6  # pixels
    # and the ball is round again: as tall as it is wide (80 mm, to a slice)
    tall = np.count_nonzero((fixed.hu > 0).any((1, 2))) * fixed.spacing_mm[0]
    wide = np.count_nonzero((fixed.hu > 0).any((0, 2))) * fixed.spacing_mm[1]
    assert abs(tall - 80.0) <= 5.0 and abs(wide - 80.0) <= 4.0
    # each new slice stands for a received slice, bottom to top
    assert np.all(np.diff(src) >= 0) and src.min() >= 0 and src.max() <= vol.hu.shape[0] - 1
    assert len(fixed.sop_instance_uids) == fixed.hu.shape[0]
    assert set(fixed.sop_instance_uids) <= set(vol.sop_instance_uids)


def test_tilt_correction_moves_the_lesion_mask_with_the_image(tmp_path: Path) -> None:
    from triage_agent.preprocess import correct_tilt

    vol = read_series(_tilted_ball_series(tmp_path))
    fixed, mask, _ = correct_tilt(vol, vol.hu > 0)
    assert mask is not None and mask.shape == fixed.hu.shape
    inside = fixed.hu > 500
    assert (mask & inside).sum() > 0.9 * inside.sum()
    assert (mask & (fixed.hu < -500)).sum() < 0.05 * mask.sum()


def test_model_inputs_on_a_tilted_head(tmp_path: Path) -> None:
    """A tilted site's series: slice_index still names received slices; switching the
    correction off gives the uncorrected stack."""
    from triage_agent.preprocess import PreprocessOptions

    c = make_case(12, "intraparenchymal_haemorrhage", subtle=False, matrix=128, site="B")
    vol = read_series(write_case_dicom(c, tmp_path / "t", write_mask=False))
    on = model_inputs(vol, lesion_mask=c.lesion_mask,
                      options=PreprocessOptions(correct_tilt=True))
    off = model_inputs(vol, lesion_mask=c.lesion_mask,
                       options=PreprocessOptions(correct_tilt=False))
    for mi in (on, off):
        assert np.all(np.diff(mi.slice_index) >= 0)
        assert mi.slice_index.max() < vol.hu.shape[0] and mi.lesion.any()
    assert not np.array_equal(on.slice_index, off.slice_index)
    # the lesion sits on received slices that hold it
    src_area = c.lesion_mask.sum((1, 2))
    assert src_area[on.slice_index[on.lesion.sum((1, 2)) > 20]].min() > 0


def test_untilted_series_unchanged_by_the_options(case: SynthCase) -> None:
    from triage_agent.preprocess import PreprocessOptions

    vol = volume_from_case(case)
    a = model_inputs(vol)
    b = model_inputs(vol, options=PreprocessOptions(correct_tilt=True, slab_mm=0.0,
                                                    align_yaw=False))
    assert np.array_equal(a.x, b.x) and np.array_equal(a.slice_index, b.slice_index)


def test_thin_slices_to_slabs() -> None:
    from triage_agent.preprocess import PreprocessOptions, thin_to_slabs

    rng = np.random.default_rng(0)
    hu = (30.0 + 6.0 * rng.standard_normal((50, 32, 32))).astype(np.float32)
    vol = HUVolume(hu, (1.0, 1.0, 1.0), [f"1.2.{k}" for k in range(50)])
    mask = np.zeros(hu.shape, bool)
    mask[21, 5:9, 5:9] = True
    slab, smask, src = thin_to_slabs(vol, 5.0, mask)
    assert slab.hu.shape == (10, 32, 32) and slab.spacing_mm[0] == 5.0
    assert np.std(slab.hu) == pytest.approx(6.0 / np.sqrt(5), rel=0.1)
    assert smask is not None and smask[4].any() and smask.sum() == 16
    assert list(src) == [2, 7, 12, 17, 22, 27, 32, 37, 42, 47]
    assert slab.sop_instance_uids[0] == "1.2.2"
    same, _, _ = thin_to_slabs(HUVolume(hu, (2.5, 1.0, 1.0), [None] * 50), 5.0)
    assert same.hu is hu  # thick slices are left alone
    assert PreprocessOptions().slab_mm >= 0


def test_yaw_alignment_undoes_an_in_plane_turn() -> None:
    from scipy import ndimage as ndi

    from triage_agent.preprocess import PreprocessOptions

    c = make_case(14, "normal", matrix=128)
    vol = volume_from_case(c)
    turned = HUVolume(ndi.rotate(vol.hu, 15.0, axes=(1, 2), reshape=False, order=1,
                                 cval=-1000.0).astype(np.float32),
                      vol.spacing_mm, vol.sop_instance_uids)  # fmt: skip
    opt = PreprocessOptions(align_yaw=True)
    ref, plain, aligned = (model_inputs(vol, options=opt), model_inputs(turned),
                           model_inputs(turned, options=opt))
    assert abs(np.degrees(aligned.yaw_rad - ref.yaw_rad)) == pytest.approx(15.0, abs=3.0)

    def diff(a, b) -> float:  # noqa: ANN001
        common, ia, ib = np.intersect1d(a.slice_index, b.slice_index, return_indices=True)
        return float(np.mean(np.abs(a.x[ia] - b.x[ib])))

    assert diff(ref, aligned) < 0.6 * diff(ref, plain)


def test_noise_limit_smooths_only_noisy_series() -> None:
    from triage_agent.preprocess import PreprocessOptions, brain_noise_hu

    c = make_case(15, "normal", matrix=128)
    vol = volume_from_case(c)
    rng = np.random.default_rng(1)
    noisy = HUVolume((vol.hu + 12.0 * rng.standard_normal(vol.hu.shape)).astype(np.float32),
                     vol.spacing_mm, vol.sop_instance_uids)  # fmt: skip
    opt = PreprocessOptions(max_noise_hu=4.0)
    plain, limited = model_inputs(noisy), model_inputs(noisy, options=opt)
    assert brain_noise_hu(plain.hu, plain.brain) > 6.0
    assert brain_noise_hu(limited.hu, limited.brain) <= 4.0
    quiet = model_inputs(vol, options=PreprocessOptions(max_noise_hu=50.0))
    assert np.array_equal(quiet.x, model_inputs(vol).x)  # below the limit: untouched
