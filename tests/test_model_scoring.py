"""Loss terms, score combination, aggregation and normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from triage_model import losses, scoring
from triage_model.network import MultitaskVAE, NetConfig, NetOutput


def test_rec_kl_geo_terms():
    recon = torch.full((2, 1, 4, 4), 0.5)
    target = torch.zeros(2, 4, 4)
    assert float(losses.rec_loss(recon, target)) == pytest.approx(16 * 0.25)
    w = torch.zeros(2, 1, 4, 4)
    w[..., 0, 0] = 1
    assert float(losses.rec_loss(recon, target, w)) == pytest.approx(0.25)
    mu, lv = torch.zeros(3, 5), torch.zeros(3, 5)
    assert float(losses.kl_loss(mu, lv)) == pytest.approx(0.0)
    mu[:, 0] = 2.0
    assert float(losses.kl_loss(mu, lv)) == pytest.approx(2.0)  # 0.5 * mu^2
    logits = torch.zeros(4, 20)
    assert float(losses.geo_loss(logits, torch.zeros(4, dtype=torch.long))) == pytest.approx(math.log(20))


def test_multitask_loss_weights():
    out = NetOutput(torch.full((2, 1, 4, 4), 0.5), torch.zeros(2, 3), torch.zeros(2, 3),
                    torch.zeros(2, 20))
    t = losses.multitask_loss(out, torch.zeros(2, 4, 4), torch.zeros(2, dtype=torch.long), eps=0.1, beta=1.0)
    assert float(t["loss"]) == pytest.approx(math.log(20) + 0.1 * 4.0)
    t0 = losses.multitask_loss(out, torch.zeros(2, 4, 4), torch.zeros(2, dtype=torch.long), eps=0.0, beta=1.0)
    assert float(t0["loss"]) == pytest.approx(math.log(20)) and "rec" not in t0


def test_combine_aggregate():
    assert scoring.combine(2.0, 4.0, 0.5) == pytest.approx(3.0)
    assert scoring.combine(2.0, 4.0, 0.0) == pytest.approx(2.0)
    assert scoring.combine(2.0, 4.0, 1.0) == pytest.approx(4.0)
    np.testing.assert_allclose(scoring.combine(np.array([0.0, 1.0]), np.array([1.0, 3.0]), 0.25),
                               [0.25, 1.5])
    with pytest.raises(ValueError):
        scoring.combine(1.0, 1.0, 1.5)
    s = [0.1, 5.0, 3.0, 1.0]
    assert scoring.aggregate(s, "max") == 5.0
    assert scoring.aggregate(s, "topk_mean", k=3) == pytest.approx(3.0)
    assert scoring.aggregate(s, "topk_mean", k=10) == pytest.approx(np.mean(s))
    with pytest.raises(ValueError):
        scoring.aggregate([], "max")
    with pytest.raises(ValueError):
        scoring.aggregate(s, "median")


def test_normalisation_stats():
    rng = np.random.default_rng(0)
    g, r = rng.normal(3, 2, 1000), rng.normal(-1, 0.5, 1000)
    st = scoring.NormStats.fit(g, r)
    assert st.g_mean == pytest.approx(g.mean()) and st.r_std == pytest.approx(r.std())
    z = scoring.normalise(g, st.g_mean, st.g_std)
    assert abs(z.mean()) < 1e-9 and z.std() == pytest.approx(1.0)
    assert scoring.NormStats.from_dict(st.to_dict()) == st
    const = scoring.NormStats.fit(np.ones(5), np.ones(5))
    assert const.g_std == 1.0  # degenerate std does not divide by zero


def test_masked_stat_topq_and_mean():
    maps = torch.zeros(2, 10, 10)
    brain = torch.zeros(2, 10, 10, dtype=torch.bool)
    brain[:, :5] = True  # 50 brain pixels
    maps[0, 0, :5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    maps[0, 9, 9] = 100.0  # outside the brain: ignored
    cfg = scoring.ScoringConfig(rec_stat="topq", rec_q=0.04)  # top 2 of 50
    out = scoring.masked_stat(maps, brain, cfg)
    assert float(out[0]) == pytest.approx(4.5) and float(out[1]) == 0.0
    m = scoring.masked_stat(maps, brain, scoring.ScoringConfig(rec_stat="mean"))
    assert float(m[0]) == pytest.approx(15.0 / 50)


def test_geo_error_and_smoothing():
    logits = torch.full((40, 20), -1e4)
    labels = torch.arange(20).repeat_interleave(2)
    logits[torch.arange(40), labels] = 0.0  # always right
    logits[1, labels[1]] = -1e4  # sample 1 wrong on view 0
    logits[1, 3] = 0.0
    e = scoring.geo_error(logits, labels, 20, "one_minus_p")
    assert e.shape == (2,) and float(e[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(e[1]) == pytest.approx(1 / 20, abs=1e-6)
    impulse = torch.zeros(1, 15, 15)
    impulse[0, 7, 7] = 1.0
    sm = scoring.smooth(impulse, 1.5)
    assert float(sm.sum()) == pytest.approx(1.0, abs=1e-5) and float(sm[0, 7, 7]) < 1.0
    assert torch.equal(scoring.smooth(impulse, 0), impulse)


def test_network_shapes():
    net = MultitaskVAE(NetConfig(input_size=32, base_channels=4, max_channels=8, z_dim=6,
                                 geo_hidden=8)).eval()
    with torch.no_grad():
        out = net(torch.rand(3, 1, 32, 32))
    assert out.recon.shape == (3, 1, 32, 32) and out.mu.shape == (3, 6)
    assert out.geo_logits is not None and out.geo_logits.shape == (3, 20)
    assert float(out.recon.min()) >= 0 and float(out.recon.max()) <= 1
    nog = MultitaskVAE(NetConfig(input_size=32, base_channels=4, geo_head=False))
    assert nog(torch.rand(1, 32, 32)).geo_logits is None
    with pytest.raises(ValueError):
        NetConfig(input_size=100)


def test_normalisation_per_brain_area_bin():
    rng = np.random.default_rng(1)
    area = np.concatenate([np.full(200, 0.1), np.full(200, 0.4)])
    r = np.concatenate([rng.normal(5, 1, 200), rng.normal(1, 0.1, 200)])
    g = rng.normal(0, 1, 400)
    st = scoring.NormStats.fit(g, r, area, n_bins=2)
    assert len(st.area_edges) == 1 and len(st.r_mean_bins) == 2
    _, zr = st.apply(g, r, area)
    assert abs(zr[:200].mean()) < 1e-6 and abs(zr[200:].mean()) < 1e-6
    assert zr[:200].std() == pytest.approx(1.0) and zr[200:].std() == pytest.approx(1.0)
    assert scoring.NormStats.from_dict(st.to_dict()) == st
    _, zr_global = st.apply(g, r)  # without areas: global statistics
    assert abs(zr_global.mean()) < 1e-6
    assert scoring.NormStats.fit(g, r, area[:10], n_bins=5).area_edges == ()  # too few slices


def test_slice_context_averages_neighbours_within_each_series():
    """Each slice's statistic becomes (s_i + w (s_prev + s_next)) / (1 + 2w); a series' end
    slices stand in for their missing neighbour; series never borrow from each other."""
    f = scoring.apply_slice_context
    np.testing.assert_allclose(f(np.array([0, 0, 4, 0, 0.0]), 0.5), [0, 1, 2, 1, 0])
    np.testing.assert_allclose(f(np.array([1, 2, 3, 10, 20.0]), 0.5, np.array([0, 0, 0, 1, 1])),
                               [1.25, 2.0, 2.75, 12.5, 17.5])
    np.testing.assert_allclose(f(np.array([[1, 2], [3, 4.0]]), 1.0), [[5 / 3, 8 / 3], [7 / 3, 10 / 3]],
                               rtol=1e-6)  # the symmetry option's (N,2): column by column
    a = np.array([3.0, -1.0, 7.0])
    np.testing.assert_array_equal(f(a, 0.0), a)  # off
    np.testing.assert_array_equal(f(np.array([5.0]), 0.5), [5.0])  # one slice
    assert f(np.zeros(0), 0.5).shape == (0,)
    # slices of one series need not be contiguous in a set: only the order within it counts
    np.testing.assert_allclose(f(np.array([1, 10, 2, 20, 3.0]), 0.5, np.array([0, 1, 0, 1, 0])),
                               [1.25, 12.5, 2.0, 17.5, 2.75])
    with pytest.raises(ValueError, match="slice_context"):
        f(a, -0.5)
    with pytest.raises(ValueError, match="slice_context"):
        scoring.ScoringConfig(slice_context=-1.0)
    assert scoring.ScoringConfig.from_dict({"rec_q": 0.01}).slice_context == 0.0  # old files
