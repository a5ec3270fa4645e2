"""Synthetic head CT: determinism, tissue HU, lesion masks, DICOM output (dciodvfy-clean)."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from triage_model.synth import LESION_FAMILIES, SynthCase, make_case, make_dataset_plan

SMALL = 128  # in-plane matrix for fast tests; geometry and HU do not depend on it


@pytest.fixture(scope="module")
def normal_case() -> SynthCase:
    return make_case(11, "normal", matrix=256)


def test_same_seed_same_case_and_different_seed_differs() -> None:
    a = make_case(5, "lacunar_ischaemia", matrix=SMALL)
    b = make_case(5, "lacunar_ischaemia", matrix=SMALL)
    c = make_case(6, "lacunar_ischaemia", matrix=SMALL)
    assert np.array_equal(a.hu, b.hu)
    assert np.array_equal(a.lesion_mask, b.lesion_mask)
    assert a.meta == b.meta and a.subtle == b.subtle
    assert a.hu.shape != c.hu.shape or not np.array_equal(a.hu, c.hu)


def test_label_does_not_change_the_head() -> None:
    """Same seed, different label: same pose, slices and tissue; only the lesion differs."""
    n = make_case(7, "normal", matrix=SMALL)
    les = make_case(7, "cavernoma", matrix=SMALL)
    assert n.hu.shape == les.hu.shape and n.spacing_mm == les.spacing_mm
    outside = ~les.lesion_mask
    assert np.median(np.abs(n.hu[outside] - les.hu[outside])) < 1e-3


def test_geometry_and_tissue_hu(normal_case: SynthCase) -> None:
    c = normal_case
    z, y, x = c.hu.shape
    assert c.hu.dtype == np.float32 and y == x == 256
    assert c.spacing_mm[0] in (2.5, 3.0, 4.0, 5.0)
    # field of view 205-256 mm, i.e. 0.40-0.50 mm pixels at 512
    assert 205 <= c.spacing_mm[1] * x <= 256 and c.spacing_mm[1] == c.spacing_mm[2]
    assert 25 <= z <= 90
    assert c.lesion_mask.shape == c.hu.shape and not c.lesion_mask.any()
    hu = c.meta["hu"]
    assert 0 <= hu["csf"] <= 15 and 20 <= hu["wm"] <= 30 and 35 <= hu["gm"] <= 45
    assert 3.0 <= c.meta["noise_sd"] <= 6.0
    # air in the corners, bone in the skull ring, brain in the middle
    corners = c.hu[:, :10, :10]
    assert np.all(corners < -900)
    assert np.percentile(c.hu, 99.5) > 700
    mid = c.hu[z // 2, y // 2 - 20 : y // 2 + 20, x // 2 - 20 : x // 2 + 20]
    soft = mid[(mid > -100) & (mid < 100)]
    assert 15 < np.median(soft) < 45
    # a superior slice: bone ring with diploe > 700 HU, brain 0-80 inside
    sl = c.hu[int(z * 0.65)]
    assert sl.max() > 700
    brain = sl[(sl > -50) & (sl < 150)]
    assert brain.size > 0.1 * sl.size


@pytest.mark.parametrize("family", LESION_FAMILIES)
def test_each_family_has_a_mask(family: str) -> None:
    for subtle in (True, False):
        c = make_case(100 + LESION_FAMILIES.index(family), family, subtle=subtle, matrix=SMALL)
        assert c.label == family and c.subtle is subtle
        assert c.lesion_mask.any(), f"{family} subtle={subtle}: empty mask"
        # the lesion is inside the head, not in the air around it
        assert np.median(c.hu[c.lesion_mask]) > -100


def test_normals_have_empty_masks_and_are_never_subtle() -> None:
    for seed in (1, 2):
        c = make_case(seed, "normal", matrix=SMALL)
        assert not c.lesion_mask.any() and c.subtle is False and c.label == "normal"


def test_blood_is_hyperdense() -> None:
    c = make_case(3, "intraparenchymal_haemorrhage", subtle=False, matrix=256)
    assert 55 <= np.median(c.hu[c.lesion_mask]) <= 95


def test_bad_arguments_rejected() -> None:
    with pytest.raises(ValueError, match="unknown label"):
        make_case(1, "fracture")
    with pytest.raises(ValueError, match="matrix"):
        make_case(1, "normal", matrix=255)


def test_dataset_plan_is_deterministic_and_cycles_families() -> None:
    plan = make_dataset_plan(5, 22, seed=3)
    assert plan == make_dataset_plan(5, 22, seed=3)
    assert plan != make_dataset_plan(5, 22, seed=4)
    labels = [lab for _, lab in plan]
    assert labels.count("normal") == 5
    for fam in LESION_FAMILIES:
        assert labels.count(fam) == 2
    assert len({s for s, _ in plan}) == len(plan)


# --------------------------------------------------------------------------------- DICOM


@pytest.fixture(scope="module")
def lesion_case() -> SynthCase:
    return make_case(21, "cavernoma", subtle=False, matrix=SMALL)


@pytest.mark.parametrize("encoding", ["unsigned12", "signed", "signed_hu", "unsigned_half"])
def test_dicom_series_is_valid(tmp_path: Path, encoding: str, lesion_case: SynthCase) -> None:
    from triage_agent.synth_dicom import MASK_FILE, write_case_dicom

    c = lesion_case
    paths = write_case_dicom(
        c, tmp_path / "s", patient_name="TEST^SYNTH", patient_id="T1", encoding=encoding
    )
    assert len(paths) == c.hu.shape[0]
    ds = pydicom.dcmread(paths[3])
    assert ds.Modality == "CT" and ds.BodyPartExamined == "HEAD"
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(ds.SliceThickness) == pytest.approx(c.spacing_mm[0])
    assert float(ds.PixelSpacing[0]) == pytest.approx(c.spacing_mm[1], abs=1e-5)
    assert ds.Rows == ds.Columns == SMALL
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.allclose(hu, c.hu[3], atol=float(ds.RescaleSlope) / 2 + 1e-3)
    mask = np.load(tmp_path / "s" / MASK_FILE)["mask"]
    assert mask.shape == c.hu.shape and mask.sum() == c.lesion_mask.sum()

    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed")
    for p in (paths[0], paths[len(paths) // 2]):
        r = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True, timeout=60)
        out = r.stdout + r.stderr
        errors = [ln for ln in out.splitlines() if ln.startswith("Error")]
        assert not errors, out


def test_dicom_uids_are_deterministic(tmp_path: Path, lesion_case: SynthCase) -> None:
    from triage_agent.synth_dicom import write_case_dicom

    c = lesion_case
    a = write_case_dicom(c, tmp_path / "a", patient_name="A^B", patient_id="1")
    b = write_case_dicom(c, tmp_path / "b", patient_name="A^B", patient_id="1")
    for pa, pb in zip(a[:3], b[:3], strict=True):
        assert pa.read_bytes() == pb.read_bytes()
    da, db = pydicom.dcmread(a[0]), pydicom.dcmread(a[1])
    assert da.SeriesInstanceUID == db.SeriesInstanceUID
    assert da.SOPInstanceUID != db.SOPInstanceUID


def test_cli_writes_series_masks_and_labels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from triage_agent.cli import main

    out = tmp_path / "synth"
    rc = main(
        ["synth", str(out), "--normals", "1", "--abnormals", "2", "--seed", "5",
         "--matrix", str(SMALL), "--families", "epidural_haematoma,cavernoma",
         "--preview", str(tmp_path / "preview.png")]
    )  # fmt: skip
    assert rc == 0
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows].count("normal") == 1
    assert {r["label"] for r in rows} == {"normal", "epidural_haematoma", "cavernoma"}
    assert set(rows[0]) >= {"case_id", "series_instance_uid", "study_instance_uid", "label",
                            "subtle", "seed", "n_slices"}  # fmt: skip
    for r in rows:
        files = sorted((out / r["case_id"]).glob("*.dcm"))
        assert len(files) == int(r["n_slices"])
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert ds.SeriesInstanceUID == r["series_instance_uid"]
        assert ds.StudyInstanceUID == r["study_instance_uid"]
        mask = np.load(out / r["case_id"] / "mask.npz")["mask"]
        assert mask.shape[0] == len(files)
        assert mask.any() == (r["label"] != "normal")
    assert "wrote 3 series" in capsys.readouterr().out
    assert (tmp_path / "preview.png").stat().st_size > 1000
    assert main(["synth", str(out), "--families", "nope"]) == 2
