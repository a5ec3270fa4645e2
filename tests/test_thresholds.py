"""One threshold rule: training/atlas calibration and `triage-agent calibrate` give the same
threshold from the same normal scores, and `calibrate` says so when the model is out of range."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from triage_model.atlas import main as atlas_main
from triage_model.checkpoint import make_checkpoint, read_checkpoint, save_checkpoint
from triage_model.network import NetConfig, build_network
from triage_model.scoring import ScoringConfig
from triage_model.thresholds import threshold_for_specificity
from triage_model.train import calibrate_from_raw, random_slices

from triage_agent.cli import main
from triage_agent.commands import calibrate as calibrate_cmd

REPO = Path(__file__).resolve().parent.parent
S = 32


def test_rule_keeps_the_target_share_of_normals_below_and_is_shared() -> None:
    scores = np.arange(20, dtype=float)  # 0..19
    # 19 of 20 below at 0.95: midway between the two highest; all 20 at 0.99: above the highest
    assert threshold_for_specificity(scores, 0.95) == 18.5
    assert threshold_for_specificity(scores, 0.99) == pytest.approx(19.95)
    assert threshold_for_specificity(scores[::-1], 0.90) == 17.5
    with pytest.raises(ValueError):
        threshold_for_specificity([], 0.95)


def _tiny(thresholds: dict[str, float] | None = None) -> dict:  # type: ignore[type-arg]
    torch.manual_seed(0)
    net = build_network(NetConfig(input_size=S, base_channels=4, max_channels=16, arch="unet",
                                  geo_head=False, unet_levels=3))
    return make_checkpoint("dae", net=net, input_size=S, scoring=ScoringConfig(rec_q=0.05),
                           thresholds=thresholds)


def test_model_calibration_and_atlas_command_use_the_same_rule(tmp_path: Path) -> None:
    val = random_slices(60, S, seed=4, n_series=20)
    rng = np.random.default_rng(0)
    g, r = np.zeros(len(val), np.float32), rng.normal(1.0, 0.2, len(val)).astype(np.float32)
    ck = calibrate_from_raw(_tiny(), val, g, r, np.zeros_like(val.x))
    ser = ck["calibration"]["val_series_scores_max"]
    assert len(ser) == 20
    assert ck["thresholds"]["max"] == threshold_for_specificity(ser, 0.95)
    assert ck["thresholds"]["max"] != pytest.approx(float(np.quantile(ser, 0.95)))

    save_checkpoint(_tiny(), tmp_path / "in.pt")
    random_slices(40, S, seed=3, n_series=8).save(tmp_path / "normals.npz")
    assert atlas_main([str(tmp_path / "out.pt"), "--model", str(tmp_path / "in.pt"), "--slices",
                       str(tmp_path / "normals.npz"), "--atlas-fraction", "0.5",
                       "--bins", "2"]) == 0
    out, _ = read_checkpoint(tmp_path / "out.pt")
    assert out["thresholds"]["max"] == threshold_for_specificity(
        out["calibration"]["val_series_scores_max"], 0.95)


def test_range_warnings_name_the_cause_and_the_command() -> None:
    normal = np.linspace(10, 20, 20)
    w = calibrate_cmd.range_warnings(normal, np.array([3.0, 4.0, 5.0]), 19.99, 4.337, 0.95)
    assert len(w) == 2
    assert "above all of the 3 abnormal series" in w[0]
    assert "20 of 20 normal series score at or above the model's own threshold 4.337" in w[1]
    assert all("triage-agent onboard" in s for s in w)
    fitting = calibrate_cmd.range_warnings(np.linspace(-1, 1, 20), np.array([3.0, 0.5]), 0.9,
                                           1.0, 0.95)
    assert fitting == []


def test_calibrate_warns_when_the_sites_normals_score_far_above_the_model(
        tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "m.pt"
    save_checkpoint(_tiny({"max": -1.0e6, "topk_mean": -1.0e6}), model)
    data = tmp_path / "synth"
    assert main(["synth", str(data), "--normals", "5", "--abnormals", "0", "--seed", "8",
                 "--matrix", "128"]) == 0
    cfg = tmp_path / "agent.toml"
    shutil.copy(REPO / "agent.toml", cfg)
    capsys.readouterr()
    assert main(["calibrate", "--config", str(cfg), "--normal", str(data), "--model",
                 str(model)]) == 0
    err = capsys.readouterr().err
    assert "5 of 5 normal series score at or above the model's own threshold" in err
    assert "does not fit this site's images" in err and "triage-agent onboard" in err
