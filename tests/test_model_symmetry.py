"""Left-right symmetry scoring: midline fit, asymmetric residual, and the (N,2) s_r it feeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from triage_model.checkpoint import Detector, make_checkpoint
from triage_model.network import NetConfig, build_network
from triage_model.scoring import NormStats, ScoringConfig
from triage_model.symmetry import asymmetric_residual, fit_midline, mirror, reflection
from triage_model.train import random_slices


def head(size: int, theta_deg: float, offset_px: float, seed: int = 0) -> np.ndarray:
    """A head-like slice symmetric about the line at ``theta_deg`` from vertical (the vertical
    rotated as ``triage_model.symmetry.reflection`` rotates it) ``offset_px`` pixels from the centre:
    skull ring, brain, two ventricles, and a texture made symmetric about that line."""
    t = math.radians(theta_deg)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = (size - 1) / 2
    # coordinates across (u) and along (v) the midline; the image depends on |u| only
    u = (xx - c) * math.cos(t) + (yy - c) * math.sin(t) - offset_px
    v = -(xx - c) * math.sin(t) + (yy - c) * math.cos(t)
    r = np.sqrt((u / (0.36 * size)) ** 2 + (v / (0.44 * size)) ** 2)
    img = np.where(r < 1.0, 0.45, 0.0) + np.where((r >= 0.9) & (r < 1.0), 0.55, 0.0)
    vent = ((np.abs(u) - 0.08 * size) / (0.04 * size)) ** 2 + ((v + 0.05 * size) / (0.12 * size)) ** 2
    img = np.where(vent < 1.0, 0.05, img)
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(3, 2))
    tex = sum(0.04 * np.cos(k[i, 0] * np.abs(u) / 6 + k[i, 1] * v / 6) for i in range(3))
    return np.clip(img + np.where(r < 0.88, tex, 0.0), 0, 1).astype(np.float32)


def angle_and_offset(m: torch.Tensor, size: int) -> tuple[float, float]:
    """Back from a reflection matrix to (theta in degrees, offset in pixels)."""
    a = m[:2, :2].double()
    theta = 0.5 * math.atan2(-float(a[0, 1]), -float(a[0, 0]))
    # the line passes through t/2 (the fixed point of x -> A x + t nearest the centre)
    t = m[:, 2].double()
    d = 0.5 * (float(t[0]) * math.cos(theta) + float(t[1]) * math.sin(theta))
    return math.degrees(theta), d * size / 2


@pytest.mark.parametrize("theta,offset", [(0.0, 0.0), (7.0, 3.0), (-9.5, -4.5), (4.0, -7.0)])
def test_fit_midline_finds_the_line_a_tilted_shifted_head_is_symmetric_about(theta, offset):
    size = 128
    img = torch.from_numpy(head(size, theta, offset))[None]
    m = fit_midline(img)
    assert m.shape == (1, 2, 3)
    got_t, got_o = angle_and_offset(m[0], size)
    assert abs(got_t - theta) <= 1.0 and abs(got_o - offset) <= 0.75, (got_t, got_o)
    # its mirror image is the slice again (up to interpolation), and a wrong line is worse
    good = float((img - mirror(img, m)).abs().mean())
    wrong = reflection(torch.tensor([0.0]), torch.tensor([0.0]))
    if theta or offset:
        assert good < 0.5 * float((img - mirror(img, wrong)).abs().mean())
    assert good < 0.02


def test_reflection_is_its_own_inverse():
    m = reflection(torch.tensor([0.2, -0.1]), torch.tensor([0.05, -0.03]))
    full = torch.cat([m, torch.tensor([[[0.0, 0.0, 1.0]]]).expand(2, -1, -1)], 1)
    torch.testing.assert_close(full @ full, torch.eye(3).expand(2, -1, -1), atol=1e-6, rtol=0)


def test_asymmetric_residual_keeps_one_sided_residual_and_cancels_a_shared_one():
    size = 64
    img = torch.from_numpy(head(size, 5.0, 2.0))[None]
    m = fit_midline(img)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    brain = (((yy - 31.5) ** 2 + (xx - 31.5) ** 2) < (0.32 * size) ** 2)[None]
    # a residual both sides share (e.g. both ventricles filled in) plus a lesion on one side
    heat = 0.3 * ((img < 0.1) & brain).float()
    heat = 0.5 * (heat + mirror(heat, m))  # exactly symmetric about the fitted midline
    lesion = ((yy - 24) ** 2 + (xx - 22) ** 2 <= 9)[None]
    a_shared = asymmetric_residual(heat, brain, m)
    a_lesion = asymmetric_residual(heat + 0.4 * lesion.float(), brain, m)
    assert float(a_shared.max()) < 0.02
    assert float(a_lesion[lesion & brain].mean()) > 0.3
    assert float(a_lesion[~lesion].max()) < 0.05  # the lesion's mirror place stays clean
    assert torch.all(a_lesion[~brain] == 0)


def test_norm_stats_with_asymmetry_take_the_larger_z_and_round_trip():
    rng = np.random.default_rng(0)
    r = np.stack([rng.normal(2.0, 0.5, 400), rng.normal(0.3, 0.1, 400)], 1)
    ns = NormStats.fit(np.zeros(400), r)
    assert ns.r_mean == pytest.approx(2.0, abs=0.1) and ns.a_mean == pytest.approx(0.3, abs=0.02)
    back = NormStats.from_dict(ns.to_dict())
    assert back == ns
    probe = np.array([[2.0 + 4 * ns.r_std, 0.3], [2.0, 0.3 + 5 * ns.a_std]])
    _, z = back.apply(np.zeros(2), probe)
    np.testing.assert_allclose(z, [4.0, 5.0], atol=0.2)
    # old checkpoints (no a_mean / a_std) still load, and a 1-D s_r scores as before
    old = NormStats.from_dict({"r_mean": 2.0, "r_std": 0.5})
    assert old.a_std == 1.0 and float(old.apply(np.zeros(1), np.array([3.0]))[1][0]) == 2.0


def test_detector_with_symmetry_scores_the_larger_of_the_two_terms():
    torch.manual_seed(0)
    net = build_network(NetConfig(input_size=32, base_channels=4, max_channels=16, arch="unet",
                                  geo_head=False, unet_levels=3))
    data = random_slices(6, 32, seed=3, n_series=1)
    plain = Detector(make_checkpoint("dae", net=net, input_size=32,
                                     scoring=ScoringConfig(rec_q=0.05)), device="cpu")
    ck = make_checkpoint("dae", net=net, input_size=32,
                         scoring=ScoringConfig(rec_q=0.05, symmetry=True),
                         norm=NormStats(r_mean=0.1, r_std=0.05, a_mean=0.02, a_std=0.01))
    det = Detector(ck, device="cpu")
    g, r, heat = det.raw_scores(data.x, data.brain)
    assert r.shape == (6, 2) and np.all(r[:, 1] <= r[:, 0] + 1e-6)  # a part of the residual
    g0, r0, heat0 = plain.raw_scores(data.x, data.brain)
    np.testing.assert_allclose(r[:, 0], r0, rtol=1e-5)
    np.testing.assert_allclose(heat, heat0, atol=1e-6)  # the heat map is the residual's
    s = det.score(data.x, data.brain).score
    np.testing.assert_allclose(s, np.maximum((r[:, 0] - 0.1) / 0.05, (r[:, 1] - 0.02) / 0.01),
                               rtol=1e-4, atol=1e-4)


def test_slice_context_scores_neighbour_averaged_statistics_and_calibrates_the_same_way():
    """With ``slice_context`` the detector's slice scores are z-scores of the neighbour-averaged
    statistics of the series, the heat maps stay per slice, and calibration averages the
    validation statistics series by series before fitting the normalisation, so that a normal
    validation slice still scores about 0."""
    from triage_model.train import calibrate

    torch.manual_seed(0)
    net = build_network(NetConfig(input_size=32, base_channels=4, max_channels=16, arch="unet",
                                  geo_head=False, unet_levels=3))
    data = random_slices(12, 32, seed=5, n_series=3)
    plain = Detector(make_checkpoint("dae", net=net, input_size=32,
                                     scoring=ScoringConfig(rec_q=0.05),
                                     norm=NormStats(r_mean=0.1, r_std=0.05)), device="cpu")
    ck = make_checkpoint("dae", net=net, input_size=32,
                         scoring=ScoringConfig(rec_q=0.05, slice_context=0.5),
                         norm=NormStats(r_mean=0.1, r_std=0.05))
    det = Detector(ck, device="cpu")
    one = data.series == data.series[0]
    x, brain = data.x[one], data.brain[one]
    _, r, _ = plain.raw_scores(x, brain)
    ctx = (r + 0.5 * (np.r_[r[:1], r[:-1]] + np.r_[r[1:], r[-1:]])) / 2.0
    got, ref = det.score(x, brain), plain.score(x, brain)
    np.testing.assert_allclose(got.score, (ctx - 0.1) / 0.05, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got.score, ref.score)
    np.testing.assert_allclose(got.heatmap, ref.heatmap, atol=1e-6)
    cal = calibrate(ck, data)
    _, r_all, _ = plain.raw_scores(data.x, data.brain)
    want = np.concatenate([(lambda v: (v + 0.5 * (np.r_[v[:1], v[:-1]] + np.r_[v[1:], v[-1:]]))
                            / 2.0)(r_all[data.series == s]) for s in np.unique(data.series)])
    assert cal["norm"]["r_mean"] == pytest.approx(float(want.mean()), rel=1e-5)
    assert cal["norm"]["r_std"] == pytest.approx(float(want.std()), rel=1e-4)
    assert cal["scoring"]["slice_context"] == 0.5
