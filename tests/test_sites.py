"""Site profiles of the synthetic generator: each knob changes the images it should, the
training site is the original generator, and tilted series carry a scanner's geometry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
from triage_model.sites import DEV_SITES, SITES, TEST_SITES, get_site
from triage_model.synth import SynthCase, make_case

M = 96  # in-plane matrix: small for speed; the knobs do not depend on it


def _brain_patch(c: SynthCase, frac: float = 0.6, half: int = 8) -> np.ndarray:
    z = int(frac * c.hu.shape[0])
    ys, xs = np.nonzero((c.hu[z] > 10) & (c.hu[z] < 60))
    cy, cx = int(np.median(ys)), int(np.median(xs))
    return c.hu[z, cy - half : cy + half, cx - half : cx + half]


def _pixel_noise(c: SynthCase) -> float:
    """Noise SD from horizontal neighbour differences in mid-brain (anatomy is smooth there)."""
    p = _brain_patch(c)
    return float(np.std(np.diff(p, axis=1)) / np.sqrt(2))


def test_roles_and_names() -> None:
    assert SITES["train"].role == "train"
    assert len(DEV_SITES) >= 3 and len(TEST_SITES) >= 3
    assert not set(DEV_SITES) & set(TEST_SITES)
    assert get_site(None) is SITES["train"]
    with pytest.raises(ValueError, match="unknown site"):
        get_site("Z")
    with pytest.raises(ValueError, match="kernel"):
        dataclasses.replace(SITES["A"], kernel="bone")


def test_training_site_is_the_original_generator() -> None:
    a = make_case(5, "cavernoma", matrix=M)
    b = make_case(5, "cavernoma", matrix=M, site="train")
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.lesion_mask, b.lesion_mask)
    assert a.meta["gantry_tilt_deg"] == 0.0


def test_sites_are_deterministic_and_differ() -> None:
    a = make_case(8, "normal", matrix=M, site="C")
    b = make_case(8, "normal", matrix=M, site="C")
    t = make_case(8, "normal", matrix=M)
    assert np.array_equal(a.hu, b.hu) and a.meta == b.meta
    assert a.hu.shape != t.hu.shape or not np.array_equal(a.hu, t.hu)


def test_acquisition_knobs() -> None:
    for site in ("A", "B", "C", "D"):
        p = SITES[site]
        c = make_case(3, "normal", matrix=M, site=site)
        assert c.spacing_mm[0] in p.thickness_mm
        assert p.fov_mm[0] - 1e-6 <= c.spacing_mm[1] * M <= p.fov_mm[1] + 1e-6
        yaw, pitch, roll = c.meta["pose_deg"]
        assert p.yaw_deg[0] <= yaw <= p.yaw_deg[1] and p.roll_deg[0] <= roll <= p.roll_deg[1]
        assert p.tilt_deg[0] <= c.meta["gantry_tilt_deg"] <= p.tilt_deg[1]
    # 0.625 mm slices cover the head with several times more slices than 5 mm ones
    d, b = make_case(4, "normal", matrix=M, site="D"), make_case(4, "normal", matrix=M, site="B")
    assert d.hu.shape[0] > 5 * b.hu.shape[0]


def test_noise_and_kernel_change_the_pixels() -> None:
    seeds = (1, 2)
    noisy = np.mean([_pixel_noise(make_case(s, "normal", matrix=256, site="A")) for s in seeds])
    calm = np.mean([_pixel_noise(make_case(s, "normal", matrix=256, site="B")) for s in seeds])
    train = np.mean([_pixel_noise(make_case(s, "normal", matrix=256)) for s in seeds])
    assert noisy > 1.5 * train > 2.0 * calm

    # the same head through a smooth and a sharp kernel: the skull edge is steeper when sharp
    base = dataclasses.replace(SITES["C"], streak_hu=(0.0, 0.0), beam_hardening_hu=(0.0, 0.0),
                               noise_hu=(0.0, 0.0), noise_clip=(0.0, 0.0))
    from scipy import ndimage as ndi

    detail = {}
    for k in ("smooth", "sharp"):
        c = make_case(6, "normal", matrix=256, site=dataclasses.replace(base, kernel=k))
        z = c.hu.shape[0] // 2
        hf = c.hu[z] - ndi.gaussian_filter(c.hu[z], 1.0)  # fine detail left after a 1 px blur
        detail[k] = float(np.abs(hf[c.hu[z] > -500]).mean())
    assert detail["sharp"] > 1.5 * detail["smooth"]


def test_streaks_live_at_the_skull_base() -> None:
    site = dataclasses.replace(SITES["C"], streak_hu=(25.0, 25.0), beam_hardening_hu=(12.0, 12.0))
    clean = dataclasses.replace(site, streak_hu=(0.0, 0.0), beam_hardening_hu=(0.0, 0.0))
    a = make_case(9, "normal", matrix=M, site=site)
    b = make_case(9, "normal", matrix=M, site=clean)
    soft = (b.hu > -100) & (b.hu < 100)
    diff = np.abs(a.hu - b.hu) * soft
    per_slice = diff.sum((1, 2)) / np.maximum(soft.sum((1, 2)), 1)
    n = len(per_slice)
    assert per_slice[: n // 3].max() > 1.0  # skull base: streaks and the dark band
    assert per_slice[-n // 4 :].max() < 0.2  # vertex: no dense bone in the middle


def test_anatomy_knobs() -> None:
    young = dataclasses.replace(SITES["A"], vent_grow_mm=(-1.0, -1.0), sulc_open=(0.0, 0.0))
    old = dataclasses.replace(SITES["A"], vent_grow_mm=(3.5, 3.5), sulc_open=(0.16, 0.16))
    csf = [((make_case(2, "normal", matrix=M, site=s).hu > -5)
            & (make_case(2, "normal", matrix=M, site=s).hu < 15)).sum() for s in (young, old)]
    assert csf[1] > 1.2 * csf[0]
    dry = dataclasses.replace(SITES["C"], sinus_fluid_p=0.0, mastoid_sclerosis_p=0.0)
    wet = dataclasses.replace(SITES["C"], sinus_fluid_p=1.0, mastoid_sclerosis_p=1.0)
    air = [(make_case(2, "normal", matrix=M, site=s).hu < -900).sum() for s in (dry, wet)]
    assert air[1] < air[0]


def test_tilted_series_carries_scanner_geometry(tmp_path: Path) -> None:
    from triage_agent.preprocess import read_series
    from triage_agent.synth_dicom import write_case_dicom

    c = make_case(4, "normal", matrix=64, site="B")
    tilt = c.meta["gantry_tilt_deg"]
    assert 12.0 <= tilt <= 20.0
    paths = write_case_dicom(c, tmp_path / "s", write_mask=False)
    ds = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths[:3]]
    assert float(ds[0].GantryDetectorTilt) == pytest.approx(tilt, abs=0.01)
    iop = np.array([float(v) for v in ds[0].ImageOrientationPatient])
    assert np.degrees(np.arctan2(iop[5], iop[4])) == pytest.approx(tilt, abs=0.01)
    ipp = np.array([[float(v) for v in d.ImagePositionPatient] for d in ds])
    step = np.diff(ipp, axis=0)
    # the table moves along z only; the slices are `thickness` apart along their normal
    assert np.allclose(step[:, :2], 0.0, atol=1e-3)
    assert step[0, 2] == pytest.approx(c.spacing_mm[0] / np.cos(np.radians(tilt)), abs=1e-3)
    vol = read_series(paths)
    assert vol.spacing_mm[0] == pytest.approx(c.spacing_mm[0], abs=1e-3)
    assert vol.affine_zyx is not None
    # one row step moves sin(tilt) * pixel up: the stack is sheared
    assert vol.affine_zyx[0, 1] == pytest.approx(c.spacing_mm[1] * np.sin(np.radians(tilt)),
                                                 rel=1e-3)


def test_untilted_series_has_no_affine(tmp_path: Path) -> None:
    from triage_agent.preprocess import read_series
    from triage_agent.synth_dicom import write_case_dicom

    c = make_case(4, "normal", matrix=64, site="C")
    vol = read_series(write_case_dicom(c, tmp_path / "s", write_mask=False))
    assert vol.affine_zyx is None
    d = pydicom.dcmread(sorted((tmp_path / "s").glob("*.dcm"))[0], stop_before_pixels=True)
    assert float(d.GantryDetectorTilt) == 0.0 and d.ManufacturerModelName == "synth-site-C"


def test_cli_site(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from triage_agent.cli import main

    out = tmp_path / "b"
    assert main(["synth", str(out), "--site", "B", "--normals", "1", "--abnormals", "0",
                 "--matrix", "64"]) == 0
    f = sorted(out.rglob("CT0001.dcm"))[0]
    assert float(pydicom.dcmread(f, stop_before_pixels=True).GantryDetectorTilt) >= 12.0
    assert main(["synth", str(out), "--site", "nowhere"]) == 2
    assert "unknown site" in capsys.readouterr().err


def test_site_eval_plans_and_metrics(tmp_path: Path) -> None:
    from triage_agent.preprocess import PreprocessOptions
    from triage_agent.site_eval import SiteCase, load_case, metrics, site_plan

    on, test = site_plan("B", 4, 3, 2)
    assert site_plan("B", 4, 3, 2) == (on, test)
    assert {s for s, _ in on}.isdisjoint(s for s, _ in test)
    assert {s for s, _ in on}.isdisjoint(s for s, _ in site_plan("C", 4, 3, 2)[0])
    assert [lab for _, lab in on] == ["normal"] * 4
    assert sum(lab != "normal" for _, lab in test) == 2

    # a case is made once (DICOM round trip, preprocessing) and then read from the cache
    seed, label = test[0]
    opts = PreprocessOptions()
    a = load_case(tmp_path, "B", seed, label, matrix=64, size=32, opts=opts)
    assert a.x.shape[1:] == (32, 32) and a.x.shape == a.brain.shape == a.lesion.shape
    assert len(list(tmp_path.rglob("*.npz"))) == 1
    b = load_case(tmp_path, "B", seed, label, matrix=64, size=32, opts=opts)
    assert np.array_equal(a.x, b.x)

    def case(label: str, lesion_slices: list[int]) -> SiteCase:
        les = np.zeros((4, 2, 2), bool)
        les[lesion_slices] = True
        return SiteCase("c", label, np.zeros((4, 2, 2), np.float32), np.ones((4, 2, 2), bool),
                        les)

    cases = [case("normal", []), case("normal", []), case("cavernoma", [2]), case("tumour", [1])]
    scores = [np.array([0.0, 1.0, 0.5, 0.2]), np.array([3.0, 0.1, 0.1, 0.1]),
              np.array([0.0, 0.0, 5.0, 0.0]), np.array([0.0, 2.0, 0.0, 0.0])]
    m = metrics(cases, scores, threshold=2.5)
    assert m["series_auroc"] == pytest.approx(0.75)
    assert m["specificity"] == 0.5 and m["sensitivity"] == 0.5
    assert m["normal_top_slice_low_quarter"] == 0.5  # the second normal peaks at its bottom


def test_site_eval_scores_zero_shot_with_the_chosen_runtime(tmp_path: Path) -> None:
    """`python -m triage_agent.site_eval --zero-shot-only` makes only the test series, and
    `--runtime` picks the inference path: the lean plan of a four-member ensemble scores
    differently from the reference."""
    import json

    import torch
    from triage_model.checkpoint import make_checkpoint, save_checkpoint
    from triage_model.network import NetConfig, UNetEnsemble
    from triage_model.scoring import ScoringConfig

    from triage_agent.site_eval import main as site_eval

    torch.manual_seed(7)
    member = NetConfig(input_size=32, base_channels=4, max_channels=8, arch="unet",
                       unet_levels=2).to_dict()
    net = UNetEnsemble(NetConfig(input_size=32, arch="ensemble", members=(member,) * 4))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ck = make_checkpoint("dae", net=net.eval(), scoring=ScoringConfig(flip_tta=True, rec_q=0.05),
                         thresholds={"max": 1.0})
    save_checkpoint(ck, tmp_path / "tiny.pt")
    scores = {}
    for runtime in ("reference", "lean"):
        out = tmp_path / f"{runtime}.json"
        assert site_eval(["--site", "D", "--zero-shot-only", "--test-normals", "1",
                          "--test-abnormals", "1", "--matrix", "64", "--model",
                          str(tmp_path / "tiny.pt"), "--runtime", runtime,
                          "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
        (res,) = json.loads(out.read_text())["results"]
        assert "onboarded" not in res
        scores[runtime] = [s for _, s in res["zero_shot"]["series_scores"]]
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 2  # no onboarding normals made
    assert len(scores["lean"]) == 2
    assert max(abs(a - b) for a, b in zip(scores["lean"], scores["reference"],
                                          strict=True)) > 1e-4


def test_site_eval_onboards_with_the_chosen_atlas_height(tmp_path: Path) -> None:
    """`--atlas-height` picks what the refitted atlas's bands are bands of, and the result says
    which (the default is triage-agent onboard's)."""
    import json

    import torch
    from triage_model.checkpoint import make_checkpoint, save_checkpoint
    from triage_model.network import NetConfig, build_network
    from triage_model.scoring import ScoringConfig

    from triage_agent.onboarding import ONBOARD_HEIGHT
    from triage_agent.site_eval import main as site_eval

    torch.manual_seed(3)
    net = build_network(NetConfig(input_size=32, base_channels=4, max_channels=8, arch="unet",
                                  geo_head=False, unet_levels=2))
    save_checkpoint(make_checkpoint("dae", net=net.eval(), scoring=ScoringConfig(rec_q=0.05),
                                    thresholds={"max": 1.0}), tmp_path / "tiny.pt")
    for height in ("slice", None):
        out = tmp_path / f"{height}.json"
        assert site_eval(["--site", "E", "--onboarded-only", "--onboard", "2",
                          "--test-normals", "1", "--test-abnormals", "1", "--matrix", "64",
                          "--model", str(tmp_path / "tiny.pt"), "--cache", str(tmp_path / "c"),
                          "--out", str(out), *(["--atlas-height", height] if height else [])]
                         ) == 0
        (res,) = json.loads(out.read_text())["results"]
        assert res["atlas_height"] == (height or ONBOARD_HEIGHT) and "zero_shot" not in res
        assert res["onboarded"]["specificity"] is not None
