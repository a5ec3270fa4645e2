"""The denoising U-Net method (coarse noise), slice archives and the PyTorch-only launcher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from triage_model import pretext
from triage_model.checkpoint import load_detector
from triage_model.network import DenoisingUNet, MultitaskVAE, NetConfig, build_network
from triage_model.train import SliceSet, TrainConfig, random_slices, train

REPO = Path(__file__).resolve().parents[1]


def launch_train(out: Path, slices: Path, *opts: str) -> Path:
    """`python -m triage_model.train OUT --slices SLICES --device cpu OPTS...`, as a GPU machine runs it."""
    p = subprocess.run([sys.executable, "-m", "triage_model.train", str(out), "--slices", str(slices),
                        "--device", "cpu", *opts],
                       capture_output=True, text=True, timeout=240, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_coarse_noise_is_coarse_masked_and_seeded():
    x = torch.full((4, 64, 64), 0.5)
    mask = torch.zeros(4, 64, 64, dtype=torch.bool)
    mask[:, 8:56, 8:56] = True
    a = pretext.coarse_noise(x, torch.Generator().manual_seed(1), resolution=8, std=0.2, mask=mask)
    b = pretext.coarse_noise(x, torch.Generator().manual_seed(1), resolution=8, std=0.2, mask=mask)
    c = pretext.coarse_noise(x, torch.Generator().manual_seed(2), resolution=8, std=0.2, mask=mask)
    assert torch.equal(a, b) and not torch.equal(a, c)
    n = a - x
    assert torch.all(n[~mask] == 0)  # nothing added outside the mask
    inside = n[mask]
    assert 0.08 < float(inside.std()) < 0.25  # about std (bilinear upsampling smooths a little)
    # coarse: neighbouring pixels nearly equal, unlike white noise of the same size
    dx = (n[:, 9:55, 10:55] - n[:, 9:55, 9:54]).abs().mean()
    assert float(dx) < 0.35 * float(inside.abs().mean())  # white noise: ~1.4
    assert pretext.coarse_noise(x.unsqueeze(1), torch.Generator().manual_seed(1)).shape == (4, 1, 64, 64)


def test_build_network_and_unet_output():
    vae_cfg = NetConfig(input_size=32, base_channels=4, max_channels=8, z_dim=4, geo_hidden=8)
    assert isinstance(build_network(vae_cfg), MultitaskVAE)
    cfg = NetConfig(input_size=32, base_channels=4, max_channels=16, arch="unet", geo_head=False)
    net = build_network(cfg)
    assert isinstance(net, DenoisingUNet)
    out = net(torch.rand(3, 32, 32))
    assert out.recon.shape == (3, 1, 32, 32) and out.geo_logits is None
    assert out.mu.shape == (3, 0)
    with pytest.raises(ValueError, match="arch"):
        NetConfig(arch="transformer")


def test_dae_repairs_a_planted_lesion(tmp_path: Path):
    """Trained on normal phantoms only, the denoiser's residual peaks on a bright blob it has
    never seen: what a radiologist would see as the heat map pointing at the lesion."""
    torch.set_num_threads(1)
    size = 32
    data = random_slices(64, size, seed=0, n_series=8)
    tr, va = data.split(0.25, seed=0)
    net = NetConfig(input_size=size, base_channels=8, max_channels=32, unet_levels=3)
    cfg = TrainConfig(method="dae", net=net, steps=300, batch_size=16, lr=2e-3, ckpt_every=0,
                      noise_res=4, noise_std=0.3)
    train(cfg, tr, va, tmp_path / "dae.pt", progress=False, device="cpu")
    det = load_detector(tmp_path / "dae.pt", device="cpu")
    assert det.method == "dae" and det.ckpt["net_config"]["arch"] == "unet"
    test = random_slices(6, size, seed=9, n_series=2)
    lesion = np.zeros_like(test.brain)
    yy, xx = np.mgrid[:size, :size]
    lesion[:] = (yy - 14) ** 2 + (xx - 17) ** 2 <= 9
    sick = test.x.copy()
    sick[lesion & test.brain] = 0.9  # hyperdense blob inside the "brain"
    # it learned to denoise: coarse noise on unseen normal slices is mostly removed
    clean = torch.from_numpy(test.x)
    noisy = pretext.coarse_noise(clean, torch.Generator().manual_seed(5), 4, 0.3,
                                 mask=torch.from_numpy(test.brain))
    with torch.inference_mode():
        restored = det.net(noisy).recon[:, 0]
    m = torch.from_numpy(test.brain)
    assert float((restored - clean)[m].abs().mean()) < 0.5 * float((noisy - clean)[m].abs().mean())
    healthy = det.score(test.x, test.brain)
    ill = det.score(sick, test.brain)
    assert np.all(ill.score > healthy.score)
    for h, m in zip(ill.heatmap, lesion, strict=True):
        peak = np.unravel_index(np.argmax(h), h.shape)
        assert m[peak], "heat map peak is not on the planted lesion"


def test_slice_archive_roundtrip_and_rejects_other_files(tmp_path: Path):
    data = random_slices(10, 32, seed=4, n_series=3)
    p = tmp_path / "s.npz"
    data.save(p, {"source": "test", "normals": 3})
    back, summary = SliceSet.load(p)
    assert summary == {"source": "test", "normals": 3}
    assert back.x.shape == data.x.shape and back.x.dtype == np.float32
    assert np.abs(back.x - data.x).max() <= 0.5 / 255 + 1e-6  # 8-bit quantisation only
    assert np.array_equal(back.brain, data.brain) and np.array_equal(back.series, data.series)
    both = SliceSet.concat([data, random_slices(4, 32, seed=5, n_series=2)])
    assert both.n_series == 5 and len(both) == 14 and np.array_equal(both.x[:10], data.x)
    with pytest.raises(ValueError, match="different slice sizes"):
        SliceSet.concat([data, random_slices(4, 16, seed=5, n_series=2)])
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a slice archive"):
        SliceSet.load(tmp_path / "other.npz")


@pytest.mark.timeout(300)
def test_export_slices_then_train_with_the_pytorch_only_launcher(tmp_path: Path):
    """`triage-agent train --export-slices` writes what `python -m triage_model.train --slices` trains
    on (the path to a GPU machine without the DICOM stack); a spent time budget stops early
    and the checkpoint says so."""
    from triage_agent.cli import main as cli

    arch = tmp_path / "normals.npz"
    rc = cli(["train", "--synthetic", "2", "--seed", "7", "--matrix", "128", "--input-size", "32",
              "--cache", str(tmp_path / "cache"), "--export-slices", str(arch), "--no-progress"])
    assert rc == 0 and arch.exists()
    data, summary = SliceSet.load(arch)
    assert summary["source"] == "synthetic" and summary["normals"] == 2
    assert data.n_series == 2 and data.x.shape[1:] == (32, 32)
    more = tmp_path / "more.npz"  # more normals: training data only, validation stays held out
    rc = cli(["train", "--synthetic", "3", "--seed", "8", "--matrix", "128", "--input-size", "32",
              "--cache", str(tmp_path / "cache"), "--export-slices", str(more), "--no-progress"])
    assert rc == 0
    extra, _ = SliceSet.load(more)
    out = tmp_path / "dae.pt"
    p = subprocess.run([sys.executable, "-m", "triage_model.train", str(out), "--slices", str(arch),
                        "--more-slices", str(more), "--method", "dae", "--steps", "2",
                        "--batch-size", "2", "--seed", "7", "--val-fraction", "0.5",
                        "--device", "cpu"],
                       capture_output=True, text=True, timeout=240, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "dae 2 steps" in p.stdout
    det = load_detector(out, device="cpu")
    t = det.ckpt["training"]
    assert t["data"]["source"] == "synthetic" and t["steps"] == 2
    # one of the first archive's two series is validation; the other and all 3 more train
    assert t["val_series"] == 1 and t["train_series"] == 4
    assert t["train_slices"] + t["val_slices"] == len(data) + len(extra)
    assert t["data"]["more_slices"] == [{"file": "more.npz", "slices": len(extra), "series": 3,
                                         "source": "synthetic", "normals": 3, "seed": 8,
                                         "matrix": 128}]
    assert t["stopped_by_time_budget"] is False
    assert det.score(data.x, data.brain).score.shape == (len(data),)
    # replicas: another training seed on the same split (--split-seed) holds out the same series
    # and trains different weights; without --split-seed the seed moves the split too
    def replica(name: str, *opts: str) -> dict:
        out = launch_train(tmp_path / name, arch, "--method", "dae", "--steps", "2",
                           "--batch-size", "2", "--val-fraction", "0.5", *opts)
        return torch.load(out, map_location="cpu", weights_only=False)
    seeds = {s: replica(f"s{s}.pt", "--seed", str(s)) for s in range(6)}
    held_out = {s: ck["training"]["data"]["val_series_ids"] for s, ck in seeds.items()}
    assert len({tuple(v) for v in held_out.values()}) == 2  # both series get held out by some seed
    r = replica("r.pt", "--seed", "5", "--split-seed", "0")
    assert r["training"]["data"]["val_series_ids"] == held_out[0]
    assert r["training"]["data"]["split_seed"] == 0 and r["training"]["train_config"]["seed"] == 5
    w0, w5 = seeds[0]["state_dict"], r["state_dict"]
    assert any(not torch.equal(w0[k], w5[k]) for k in w0)
    # fine-tuning from r with a second noise scale: the options reach the run and its record
    ft = replica("ft.pt", "--seed", "5", "--split-seed", "0", "--init", str(tmp_path / "r.pt"),
                 "--noise-res-alt", "8", "--spot-weight", "20")
    assert ft["training"]["init_from"]["file"] == "r.pt"
    assert ft["training"]["train_config"]["noise_res_alt"] == 8
    assert ft["training"]["train_config"]["spot_weight"] == 20
    p = subprocess.run([sys.executable, "-m", "triage_model.train", str(tmp_path / "b.pt"), "--slices",
                        str(arch), "--method", "vae", "--steps", "50", "--batch-size", "2",
                        "--val-fraction", "0.5", "--time-budget", "0", "--device", "cpu"],
                       capture_output=True, text=True, timeout=240, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    t = torch.load(tmp_path / "b.pt", map_location="cpu", weights_only=False)["training"]
    assert t["stopped_by_time_budget"] is True and t["steps"] == 0 and t["planned_steps"] == 50


def test_time_budget_gives_pretraining_only_its_share(tmp_path: Path, monkeypatch):
    """With a time budget shorter than the planned steps, a method with context-restoration
    pretraining still reaches its main phase (pretraining gets its planned share of the time)."""
    import triage_model.train as mt

    clock = iter(range(10**6))
    monkeypatch.setattr(mt.time, "time", lambda: float(next(clock)))  # 1 s per clock read
    torch.set_num_threads(1)
    data = random_slices(16, 32, seed=3, n_series=4)
    tr, va = data.split(0.25, seed=0)
    net = NetConfig(input_size=32, base_channels=4, max_channels=8, z_dim=4, geo_hidden=8)
    cfg = TrainConfig(method="multitask", net=net, pretrain_steps=500, steps=500, batch_size=2,
                      ckpt_every=0)
    ck = train(cfg, tr, va, tmp_path / "m.pt", progress=False, device="cpu", time_budget_s=60)
    assert ck is not None
    t = ck["training"]
    assert t["stopped_by_time_budget"] and t["planned_steps"] == 1000
    pre = t["train_config"]["pretrain_steps"]
    assert 0 < pre < t["steps"] < 1000  # both phases ran
    assert t["train_config"]["pretrain_steps"] + t["train_config"]["steps"] == 1000


def test_flip_tta_makes_scores_mirror_symmetric():
    """With ``flip_tta`` the reconstruction is the mean of the slice's and its mirror image's, so
    a left-right mirrored study scores the same and its heat map is the mirror of the original's
    (an untrained network, without the option, breaks both)."""
    from triage_model.checkpoint import Detector, make_checkpoint
    from triage_model.scoring import ScoringConfig

    torch.manual_seed(0)
    net = build_network(NetConfig(input_size=32, base_channels=4, max_channels=16, arch="unet",
                                  geo_head=False, unet_levels=3))
    data = random_slices(4, 32, seed=2, n_series=1)
    x, brain = data.x, data.brain
    mx, mbrain = x[:, :, ::-1].copy(), brain[:, :, ::-1].copy()

    def scores(flip: bool) -> tuple[object, object]:
        ck = make_checkpoint("dae", net=net, input_size=32,
                             scoring=ScoringConfig(flip_tta=flip, rec_q=0.05))
        det = Detector(ck, device="cpu")
        return det.score(x, brain), det.score(mx, mbrain)

    a, b = scores(True)
    np.testing.assert_allclose(b.score, a.score, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b.heatmap, a.heatmap[:, :, ::-1], atol=1e-5)
    a0, b0 = scores(False)
    assert np.abs(b0.heatmap - a0.heatmap[:, :, ::-1]).max() > 1e-3
    # the mirrored pass is averaged in, not substituted: the heat maps differ with the option
    assert np.abs(a.heatmap - a0.heatmap).max() > 1e-4


def test_site_training_defaults_are_the_bundled_models_configuration():
    """`triage-agent train` on a site's own normals, with no options, trains and scores the way the
    bundled default was (method, coarse noise, scoring options chosen on the development set);
    a command-line scoring override changes only that field. The one exception is the residual
    atlas: it needs normal series other than the training and calibration ones, so it is a
    separate step (`python -m triage_model.atlas`), and a freshly trained file has none."""
    from triage_model.checkpoint import default_weights_path, read_checkpoint
    from triage_model.scoring import ScoringConfig
    from triage_model.train import default_config

    from triage_agent.commands.train import register

    bundled, _ = read_checkpoint(default_weights_path())
    ap = __import__("argparse").ArgumentParser()
    register(ap.add_subparsers())
    assert ap.parse_args(["train", "/normals"]).method == bundled["method"] == "dae"
    cfg = default_config("dae")
    from dataclasses import replace

    shipped = ScoringConfig.from_dict(bundled["scoring"])
    assert shipped.atlas_bins == 16 and bundled["atlas"]["mu"].shape == (16, 128, 128)
    assert cfg.scoring.atlas_bins == 0
    assert cfg.scoring == replace(shipped, atlas_bins=0)
    assert cfg.scoring.flip_tta
    t = bundled["training"]  # an ensemble's members were each trained like a single U-Net
    for tc in [m["training"]["train_config"] for m in t["members"]] if t.get("ensemble") \
            else [t["train_config"]]:
        assert tc["method"] == "dae"
        assert (cfg.noise_std, cfg.noise_res) == (tc["noise_std"], tc["noise_res"])
    over = default_config("dae", scoring={"rec_q": 0.01}).scoring
    assert over.rec_q == 0.01 and over.flip_tta
    from triage_model.options import overrides_from_args

    args = ap.parse_args(["train", "/normals", "--rec-q", "0.01", "--no-flip-tta",
                          "--lr-decay-steps", "5", "--eps", "0.1", "--symmetry",
                          "--spot-weight", "20", "--slice-context", "0.5"])
    extra = ("eps", "beta")  # --spot-weight comes with the shared override options
    assert overrides_from_args(args, extra) == {
        "lr_decay_steps": 5, "eps": 0.1, "spot_weight": 20.0,
        "scoring": {"rec_q": 0.01, "flip_tta": False, "symmetry": True, "slice_context": 0.5}}
    given = default_config("dae", **overrides_from_args(args, extra))
    assert not given.scoring.flip_tta and given.scoring.rec_q == 0.01 and given.lr_decay_steps == 5
    assert given.spot_weight == 20.0 and cfg.spot_weight == 0.0  # an option, off by default
    assert given.scoring.symmetry and not cfg.scoring.symmetry  # an option, off by default
    assert given.scoring.slice_context == 0.5
    assert not default_config("vae").scoring.flip_tta


def test_lr_decay_anneals_the_last_steps_and_resume_continues_a_run(tmp_path: Path):
    """``lr_decay_steps`` lowers the learning rate linearly to zero over the last steps; resuming a
    finished constant-rate run with more steps and a decay anneals it (how the bundled weights'
    GPU run was finished on a CPU), and the checkpoint records where it resumed."""
    cfg = TrainConfig(method="dae", steps=100, lr=1e-3, lr_decay_steps=40)
    assert cfg.lr_at(0) == cfg.lr_at(59) == 1e-3
    assert cfg.lr_at(60) == pytest.approx(1e-3) and cfg.lr_at(80) == pytest.approx(5e-4)
    assert cfg.lr_at(99) == pytest.approx(2.5e-5) and cfg.lr_at(100) == 0.0
    assert TrainConfig(steps=100).lr_at(99) == TrainConfig().lr  # no decay by default

    torch.set_num_threads(1)
    data = random_slices(16, 32, seed=3, n_series=4)
    tr, va = data.split(0.25, seed=0)
    net = NetConfig(input_size=32, base_channels=4, max_channels=8, unet_levels=2)
    out = tmp_path / "dae.pt"
    train(TrainConfig(method="dae", net=net, steps=4, batch_size=2, ckpt_every=0), tr, va, out,
          progress=False, device="cpu")
    first = load_detector(out, device="cpu").ckpt
    ck = train(TrainConfig(method="dae", net=net, steps=7, batch_size=2, ckpt_every=0,
                           lr_decay_steps=3), tr, va, out, progress=False, device="cpu",
               resume=True)
    assert ck is not None
    t = ck["training"]
    assert t["resumed_at_step"] == 4 and t["steps"] == 7
    assert t["train_config"]["lr_decay_steps"] == 3
    assert any(not torch.equal(first["state_dict"][k], ck["state_dict"][k])
               for k in first["state_dict"])


def test_lr_decay_fraction_anneals_a_run_that_the_time_budget_stops(tmp_path: Path, monkeypatch):
    """With ``lr_decay_fraction`` the run's progress is the larger of steps and wall time spent, so
    a run planned far beyond its time budget still ends with the learning rate near zero."""
    import triage_model.train as mt

    cfg = TrainConfig(method="dae", steps=100, lr=1e-3, lr_decay_fraction=0.2)
    assert cfg.lr_at(50) == 1e-3 and cfg.lr_at(90) == pytest.approx(5e-4)
    assert cfg.lr_at(10, time_fraction=0.9) == pytest.approx(5e-4)  # the clock is further on
    assert cfg.lr_at(10, time_fraction=1.0) == 0.0
    clock = iter(range(10**6))
    monkeypatch.setattr(mt.time, "time", lambda: float(next(clock)))  # 1 s per clock read
    torch.set_num_threads(1)
    data = random_slices(16, 32, seed=3, n_series=4)
    tr, va = data.split(0.25, seed=0)
    net = NetConfig(input_size=32, base_channels=4, max_channels=8, unet_levels=2)
    ck = train(TrainConfig(method="dae", net=net, steps=10_000, batch_size=2, ckpt_every=0,
                           lr=1e-3, lr_decay_fraction=0.5),
               tr, va, tmp_path / "d.pt", progress=False, device="cpu", time_budget_s=80)
    assert ck is not None
    t = ck["training"]
    assert t["stopped_by_time_budget"] and t["steps"] < 100
    last = t["final_losses"]  # the last step recorded (every 10th)
    assert last["step"] >= 10 and last["lr"] < 0.3e-3, "the budget-stopped run was not annealed"


def test_ensemble_of_replicas_averages_their_reconstructions(tmp_path: Path):
    """`python -m triage_model.ensemble` combines U-Nets trained apart on the same held-out series into
    one checkpoint that reconstructs with their mean and is calibrated afresh; members that were
    validated on other series, or are not U-Nets, are refused with a clear error."""
    from triage_model.ensemble import main as ensemble
    from triage_model.thresholds import threshold_for_specificity

    arch = tmp_path / "slices.npz"
    random_slices(24, 32, seed=6, n_series=6).save(arch, {"source": "random"})

    def member(name: str, *opts: str) -> Path:
        return launch_train(tmp_path / name, arch, "--steps", "3", "--batch-size", "2",
                            "--base-channels", "4", *opts)

    a = member("a.pt", "--method", "dae", "--seed", "1", "--split-seed", "0")
    b = member("b.pt", "--method", "dae", "--seed", "2", "--split-seed", "0", "--base-channels", "8")
    out = tmp_path / "ens.pt"
    assert ensemble([str(out), str(a), str(b), "--slices", str(arch)]) == 0
    det, da, db = (load_detector(p, device="cpu") for p in (out, a, b))
    x = torch.from_numpy(random_slices(3, 32, seed=8, n_series=1).x).unsqueeze(1)
    with torch.inference_mode():
        want = (da.net(x).recon + db.net(x).recon) / 2
        got = det.net(x).recon
    assert torch.allclose(got, want, atol=1e-6)
    t = det.ckpt["training"]
    assert det.method == "dae" and det.ckpt["net_config"]["arch"] == "ensemble"
    assert det.ckpt["display_name"].endswith("mean of 2 U-Nets")
    assert [m["sha256"] for m in t["members"]] == [da.weights_sha256, db.weights_sha256]
    assert t["val_series"] == da.ckpt["training"]["val_series"] == 1
    cal = det.ckpt["calibration"]
    # one validation series: the threshold keeps it below (the rule of triage_model.thresholds)
    assert cal["val_series"] == 1 and det.threshold == threshold_for_specificity(
        cal["val_series_scores_max"], cal["target_specificity"])
    assert det.threshold > max(cal["val_series_scores_max"])
    assert det.threshold != da.threshold  # calibrated afresh, not copied from a member
    data, _ = SliceSet.load(arch)
    assert det.score(data.x, data.brain).score.shape == (len(data),)
    # the same members scored with the asymmetric residual too: calibrated for it
    sym = tmp_path / "sym.pt"
    assert ensemble([str(sym), str(a), str(b), "--slices", str(arch), "--symmetry"]) == 0
    ds = load_detector(sym, device="cpu")
    assert ds.scoring.symmetry and not det.scoring.symmetry
    assert ds.norm.a_std != 1.0 and ds.norm.r_mean == pytest.approx(det.norm.r_mean, rel=1e-5)
    assert ds.threshold >= det.threshold - 1e-6  # max(z_r, z_a) >= z_r on every slice
    # ... or with slice context: recorded, and normalised on the averaged statistics
    ctx = tmp_path / "ctx.pt"
    assert ensemble([str(ctx), str(a), str(b), "--slices", str(arch), "--slice-context", "0.5"]) == 0
    dc = load_detector(ctx, device="cpu")
    assert dc.scoring.slice_context == 0.5 and det.scoring.slice_context == 0.0
    assert dc.norm.r_std != pytest.approx(det.norm.r_std, rel=1e-4)
    assert ensemble([str(tmp_path / "neg.pt"), str(a), str(b), "--slices", str(arch),
                     "--slice-context", "-1"]) == 2
    assert not (tmp_path / "neg.pt").exists()

    c = member("c.pt", "--method", "dae", "--seed", "3")  # its own split: other series held out
    assert da.ckpt["training"]["data"]["val_series_ids"] != \
        load_detector(c, device="cpu").ckpt["training"]["data"]["val_series_ids"]
    v = member("v.pt", "--method", "vae", "--seed", "1", "--split-seed", "0")
    for bad, why in ((c, "validated on different series"), (v, "only denoising U-Nets")):
        p = subprocess.run([sys.executable, "-m", "triage_model.ensemble", str(tmp_path / "x.pt"), str(a),
                            str(bad), "--slices", str(arch)],
                           capture_output=True, text=True, timeout=240, cwd=REPO)
        assert p.returncode == 2 and why in p.stderr and not (tmp_path / "x.pt").exists()


def _roughness(noise: torch.Tensor) -> torch.Tensor:
    """Mean absolute neighbour difference over mean absolute value, per slice: low for blobs."""
    dx = (noise[:, :, 1:] - noise[:, :, :-1]).abs().mean((1, 2))
    return dx / noise.abs().mean((1, 2)).clamp(min=1e-9)


def test_second_noise_scale_mixes_blob_sizes_per_slice():
    """With ``noise_res_alt`` some slices of a batch get the fine noise grid and the others the
    coarse one; without it every slice gets the coarse grid (as before)."""
    from triage_model.train import Trainer

    data = random_slices(32, 64, seed=2, n_series=4)
    x = torch.from_numpy(data.x[:32])
    full = torch.ones_like(x, dtype=torch.bool)
    net = NetConfig(input_size=64, base_channels=4, max_channels=8, unet_levels=2)
    rough = {}
    for alt in (0, 32):
        cfg = TrainConfig(method="dae", net=net, noise_res=4, noise_res_alt=alt, noise_std=0.3,
                          ckpt_every=0)
        tr = Trainer(cfg, data)
        inp, tgt, _, _ = tr.make_inputs(x, full, "main")
        assert torch.equal(tgt, x)
        rough[alt] = _roughness(inp - x)
    assert float(rough[0].max()) < 0.2  # 4x4 grid on 64 px: smooth blobs everywhere
    fine = rough[32] > 0.2
    assert 8 <= int(fine.sum()) <= 24, rough[32]  # about half the slices, drawn per slice
    assert float(rough[32][fine].min()) > 2 * float(rough[0].max())


def test_spot_corruption_paints_small_spots_in_the_brain_and_weights_their_error():
    """``spot_weight`` adds 2-6 small spots (8-30 HU peaks, sigma 0.7-2 px) inside the brain of
    every slice and returns the loss weight 1 + spot_weight on them; off, the batch is as before;
    a slice with almost no brain gets none; the weighted loss is what the step minimises."""
    from triage_model.train import Trainer

    data = random_slices(16, 64, seed=3, n_series=4)
    x, m = torch.from_numpy(data.x), torch.from_numpy(data.brain)
    m[0] = False
    m[0, :5, :5] = True  # 25 brain pixels: too few for a spot
    net = NetConfig(input_size=64, base_channels=4, max_channels=8, unet_levels=2)
    cfg = TrainConfig(method="dae", net=net, noise_std=0.0, spot_weight=20.0, ckpt_every=0,
                      batch_size=16)
    tr = Trainer(cfg, data)
    inp, tgt, _, w = tr.make_inputs(x, m, "main")
    assert torch.equal(tgt, x) and w is not None
    d = inp - x
    assert float(d[~m].abs().max()) == 0.0  # nothing outside the brain
    assert float(d[0].abs().max()) == 0.0 and float(w[0].max()) == 1.0
    peak = d[1:].abs().flatten(1).max(1).values
    assert float(peak.min()) >= 8 / 80 * 0.9 and float(peak.max()) <= 3 * 30 / 80
    spot = d.abs() > pretext.SPOT_WEIGHT_THRESHOLD
    # small, not blobs: a spot's support (> 0.8 HU) has radius <= 2 px * sqrt(2 ln(30 / 0.8))
    area = spot[1:].flatten(1).sum(1)
    assert int(area.min()) > 0 and int(area.max()) <= 6 * np.pi * 5.5**2
    assert torch.equal(w, 1.0 + 20.0 * spot.float())
    assert float((d > 0).sum()) > float((d < 0).sum())  # mostly hyperdense
    off = Trainer(TrainConfig(method="dae", net=net, noise_std=0.0, ckpt_every=0), data)
    inp0, _, _, w0 = off.make_inputs(x, m, "main")
    assert w0 is None and torch.equal(inp0, x)
    rec = tr.step()
    assert rec["loss"] > 0 and np.isfinite(rec["loss"])


def test_init_starts_from_a_checkpoint_and_refuses_a_mismatch(tmp_path: Path):
    torch.set_num_threads(1)
    data = random_slices(16, 32, seed=0, n_series=4)
    tr, va = data.split(0.25, seed=0)
    net = NetConfig(input_size=32, base_channels=4, max_channels=8, unet_levels=2)
    cfg = TrainConfig(method="dae", net=net, steps=3, batch_size=4, ckpt_every=0)
    first = train(cfg, tr, va, tmp_path / "a.pt", progress=False, device="cpu")
    assert first is not None
    # learning rate 0: the fine-tuned network must be exactly the one it started from
    cfg0 = TrainConfig(method="dae", net=net, steps=3, batch_size=4, ckpt_every=0, lr=0.0, seed=7)
    again = train(cfg0, tr, va, tmp_path / "b.pt", progress=False, device="cpu",
                  init_from=tmp_path / "a.pt")
    assert again is not None and again["training"]["init_from"]["file"] == "a.pt"
    for k, v in first["state_dict"].items():
        assert torch.equal(v, again["state_dict"][k]), k
    fresh = train(cfg0, tr, va, tmp_path / "c.pt", progress=False, device="cpu")
    assert fresh is not None
    assert any(not torch.equal(v, fresh["state_dict"][k]) for k, v in first["state_dict"].items())
    wider = TrainConfig(method="dae", net=NetConfig(input_size=32, base_channels=8,
                                                    max_channels=16, unet_levels=2),
                        steps=1, batch_size=4, ckpt_every=0)
    with pytest.raises(ValueError, match="does not match"):
        train(wider, tr, va, tmp_path / "d.pt", progress=False, device="cpu",
              init_from=tmp_path / "a.pt")
    vae = TrainConfig(method="vae", net=NetConfig(input_size=32, base_channels=4,
                                                  max_channels=8, z_dim=4), steps=1,
                      batch_size=4, ckpt_every=0)
    with pytest.raises(ValueError, match="cannot start"):
        train(vae, tr, va, tmp_path / "e.pt", progress=False, device="cpu",
              init_from=tmp_path / "a.pt")
