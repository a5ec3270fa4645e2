"""The residual atlas: pixel-wise z of the residual against normal slices at the same height."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from triage_model.atlas import fit_atlas, main, with_atlas
from triage_model.checkpoint import (
    CheckpointError,
    Detector,
    make_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from triage_model.network import NetConfig, build_network
from triage_model.scoring import (
    AtlasFitter,
    NormStats,
    ResidualAtlas,
    ScoringConfig,
    atlas_heights,
    brain_volume_heights,
    height_bins,
    masked_stat,
    residual_map,
    slice_heights,
)
from triage_model.train import calibrate, random_slices

S = 32


def test_slice_heights_are_relative_positions_within_each_series():
    np.testing.assert_allclose(slice_heights(4), [0.125, 0.375, 0.625, 0.875])
    h = slice_heights(np.array([7, 7, 3, 3, 3, 3, 7]))
    # series 7 has slices 0, 1 and 6 (three, in order); series 3 has four
    np.testing.assert_allclose(h, [1 / 6, 0.5, 0.125, 0.375, 0.625, 0.875, 5 / 6], rtol=1e-6)


def _head(areas: list[float]) -> np.ndarray:
    """Brain masks whose brain covers ``areas`` (fractions of the frame), one slice each."""
    out = np.zeros((len(areas), S, S), bool)
    for i, a in enumerate(areas):
        out[i].flat[:int(round(a * S * S))] = True
    return out


def test_brain_volume_heights_follow_the_head_not_where_the_scan_starts():
    """A scan that starts three slices lower (more skull base, little brain) or is cut twice as
    thin: each slice keeps about its height in the head, where its slice position moves."""
    head = [0.1, 0.3, 0.5, 0.6, 0.6, 0.5, 0.3, 0.1]
    h = brain_volume_heights(_head(head))
    assert np.all(np.diff(h) > 0) and h[0] > 0 and h[-1] < 1
    np.testing.assert_allclose(h[[3, 4]].mean(), 0.5, atol=1e-6)  # a symmetric head's middle

    lower = brain_volume_heights(_head([0.06, 0.06, 0.06] + head))[3:]
    assert np.max(np.abs(lower - h)) < 0.06
    assert np.max(np.abs(slice_heights(11)[3:] - slice_heights(8))) > 0.2  # what it replaces

    thin = brain_volume_heights(_head([a for a in head for _ in range(2)]))
    np.testing.assert_allclose(thin.reshape(-1, 2).mean(1), h, atol=1e-6)

    # several series at once, each on its own; a series without brain keeps slice positions
    both = brain_volume_heights(np.concatenate([_head(head), _head([0, 0])]),
                                np.array([5] * 8 + [2] * 2))
    np.testing.assert_allclose(both[:8], h)
    np.testing.assert_allclose(both[8:], [0.25, 0.75])
    np.testing.assert_allclose(atlas_heights("slice", _head(head)), slice_heights(8))
    with pytest.raises(ValueError, match="atlas height"):
        atlas_heights("mm", _head(head))


def _maps(n: int, seed: int, hotspot: tuple[int, int] | None) -> np.ndarray:
    """Residual-like maps: low noise everywhere, plus a normal 'hotspot' (a place where normal
    anatomy always leaves residual, like the skull base) when given."""
    g = np.random.default_rng(seed)
    m = 0.02 + 0.004 * g.random((n, S, S))
    if hotspot is not None:
        y, x = hotspot
        m[:, y - 1:y + 2, x - 1:x + 2] += 0.25 + 0.02 * g.random((n, 1, 1))
    return m.astype(np.float32)


def test_atlas_discounts_the_residual_that_normal_slices_always_leave_at_that_place():
    """A user-visible effect: with the plain statistic a normal slice whose usual hotspot is
    bright outranks a slice with a smaller, real lesion elsewhere; with the atlas it is the
    other way round, and the same hotspot at a height where normals do not have it still
    counts."""
    brain = np.ones((1, S, S), bool)
    cfg = ScoringConfig(rec_q=0.01)
    fitter = AtlasFitter(bins=2, size=S)
    low = _maps(40, 0, hotspot=(8, 8))  # lower half of the series: hotspot at (8, 8)
    high = _maps(40, 1, hotspot=None)
    fitter.add(low, np.ones_like(low, bool), np.full(40, 0.2), np.arange(40) // 10)
    fitter.add(high, np.ones_like(high, bool), np.full(40, 0.7), np.arange(40) // 10)
    atlas = fitter.finish(sigma=1.0, eps=0.002)
    assert atlas.bins == 2 and atlas.n_slices == 80 and atlas.n_series == 4

    normal = torch.from_numpy(_maps(1, 2, hotspot=(8, 8)))
    lesion = torch.from_numpy(_maps(1, 3, hotspot=None))
    lesion[:, 20:23, 20:23] += 0.12  # half the hotspot's size of residual, somewhere quiet
    m = torch.from_numpy(brain)

    def plain(t: torch.Tensor) -> float:
        return float(masked_stat(t, m, cfg)[0])

    def z(t: torch.Tensor, h: float) -> float:
        return float(masked_stat(atlas.zmap(t, np.array([h])), m, cfg)[0])

    assert plain(normal) > plain(lesion)
    assert z(lesion, 0.2) > z(normal, 0.2) + 5
    assert z(normal, 0.7) > 10 * max(z(normal, 0.2), 1.0)  # the hotspot is abnormal up there


def test_masked_stat_of_a_signed_map_ignores_pixels_outside_the_brain():
    cfg = ScoringConfig(rec_q=0.1)
    maps = torch.full((2, 4, 4), -2.0)
    maps[0, 0, 0] = -1.0
    maps[:, 3, 3] = 50.0  # outside the brain: must not count
    brain = torch.zeros((2, 4, 4), dtype=torch.bool)
    brain[0, :2, :] = True  # 8 pixels, top 10 % = 1 pixel
    got = masked_stat(maps, brain, cfg)
    assert got[0] == pytest.approx(-1.0)
    assert got[1] == 0.0  # a slice without brain scores 0, not -inf


def test_atlas_round_trips_through_a_checkpoint_as_float16():
    g = np.random.default_rng(0)
    mu = g.random((3, S, S)).astype(np.float32)
    atlas = ResidualAtlas(mu, mu + 0.5, eps=0.003, n_series=7, n_slices=70, sigma=2.0)
    ck = make_checkpoint("dae", net=_net(), input_size=S, scoring=ScoringConfig(atlas_bins=3))
    ck["atlas"] = atlas.to_dict()
    assert ck["atlas"]["mu"].dtype == torch.float16
    back = ResidualAtlas.from_dict(ck["atlas"])
    np.testing.assert_allclose(back.mu, mu, atol=1e-3)
    assert (back.bins, back.eps, back.n_series, back.n_slices, back.sigma) == (3, 0.003, 7, 70, 2.0)
    assert back.height == "slice"
    vol = ResidualAtlas(mu, mu + 0.5, height="brain_volume")
    assert ResidualAtlas.from_dict(vol.to_dict()).height == "brain_volume"
    old = vol.to_dict()
    del old["height"]  # a file written before atlases had a height kind
    assert ResidualAtlas.from_dict(old).height == "slice"
    with pytest.raises(ValueError, match="atlas height"):
        ResidualAtlas(mu, mu, height="mm")
    with pytest.raises(ValueError, match="bins,S,S"):
        ResidualAtlas.from_dict({"mu": mu, "sd": mu[:2]})


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(NetConfig(input_size=S, base_channels=4, max_channels=16, arch="unet",
                                   geo_head=False, unet_levels=3))


@pytest.mark.parametrize("height", ["slice", "brain_volume"])
def test_detector_scores_with_the_atlas_and_calibrates_to_normal_z(tmp_path: Path, height: str):
    """Fit on some normal series, calibrate on others, save, load: the loaded detector's slice
    statistic is the top-q mean of the atlas z-map at each slice's height in its series (of the
    atlas's kind), the heat maps are the plain residual, and the calibration series score about
    0 on average."""
    net = _net()
    base = make_checkpoint("dae", net=net, input_size=S, scoring=ScoringConfig(rec_q=0.05),
                           norm=NormStats(r_mean=0.1, r_std=0.05))
    normals = random_slices(24, S, seed=1, n_series=4)
    cal_set = random_slices(18, S, seed=2, n_series=3)
    atlas = fit_atlas(base, normals, bins=4, sigma=1.0, eps=0.002, height=height)
    assert atlas.bins == 4 and atlas.n_series == 4 and atlas.n_slices == 24
    assert atlas.height == height
    # phantoms have no anatomy that changes with height; make the bins differ, so that a slice's
    # height within its own series (not within the whole set) visibly decides its score
    atlas = ResidualAtlas(atlas.mu + 0.02 * np.arange(4, dtype=np.float32)[:, None, None],
                          atlas.sd, atlas.eps, atlas.n_series, atlas.n_slices, atlas.sigma,
                          atlas.height)
    ck = calibrate(with_atlas(base, atlas, source="test"), cal_set)
    assert ck["scoring"]["atlas_bins"] == 4 and ck["training"]["atlas"]["source"] == "test"
    assert ck["training"]["atlas"]["sigma"] == 1.0
    save_checkpoint(ck, tmp_path / "a.pt")
    loaded, _ = read_checkpoint(tmp_path / "a.pt")
    det, plain = Detector(loaded, device="cpu"), Detector(base, device="cpu")
    assert det.atlas is not None

    one = cal_set.series == cal_set.series[0]
    x, brain = cal_set.x[one], cal_set.brain[one]
    got = det.score(x, brain)
    ref = plain.score(x, brain)
    np.testing.assert_allclose(got.heatmap, ref.heatmap, atol=1e-6)
    with torch.inference_mode():
        x1 = torch.from_numpy(x)[:, None]
        heat = residual_map(x1, net(x1).recon, torch.from_numpy(brain), det.scoring)
        heights = atlas_heights(height, brain)
        if height == "brain_volume":  # the phantoms' brains differ in size from slice to slice
            assert (height_bins(heights, 4) != height_bins(slice_heights(len(x)), 4)).any()
        zmap = det.atlas.zmap(heat, heights)
        want = masked_stat(zmap, torch.from_numpy(brain), det.scoring).numpy()
    norm = NormStats.from_dict(loaded["norm"])
    np.testing.assert_allclose(got.score, (want - norm.r_mean) / norm.r_std, rtol=1e-3, atol=1e-3)
    assert not np.allclose(got.score, ref.score)
    all_scores = np.concatenate([det.score(cal_set.x[cal_set.series == s],
                                           cal_set.brain[cal_set.series == s]).score
                                 for s in np.unique(cal_set.series)])
    assert abs(float(all_scores.mean())) < 1e-3
    assert abs(float(all_scores.std()) - 1.0) < 1e-2

    del loaded["atlas"]  # a file that asks for an atlas it does not hold
    with pytest.raises(CheckpointError, match="atlas"):
        Detector(loaded, device="cpu")


def test_atlas_cli_fits_on_one_share_of_the_normals_and_calibrates_on_the_rest(tmp_path: Path,
                                                                                capsys):
    base = make_checkpoint("dae", net=_net(), input_size=S, scoring=ScoringConfig(rec_q=0.05))
    save_checkpoint(base, tmp_path / "in.pt")
    random_slices(40, S, seed=3, n_series=8).save(tmp_path / "normals.npz")
    out = tmp_path / "out.pt"
    assert main([str(out), "--model", str(tmp_path / "in.pt"), "--slices",
                 str(tmp_path / "normals.npz"), "--atlas-fraction", "0.5", "--bins", "2"]) == 0
    msg = capsys.readouterr()
    assert "residual atlas of 2 height bins from 4 normal series" in msg.out
    assert "calibrated on 4 other series" in msg.out
    assert "use 100+" in msg.err  # few series: the user is told
    ck, _ = read_checkpoint(out)
    assert ck["scoring"]["atlas_bins"] == 2 and ck["calibration"]["val_series"] == 4
    assert Detector(ck, device="cpu").atlas is not None
    # neither or both sources: a clear error, nothing written
    assert main([str(tmp_path / "x.pt"), "--slices", str(tmp_path / "normals.npz")]) == 2
    assert "either --atlas-slices or --atlas-fraction" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
