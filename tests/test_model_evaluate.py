"""Evaluation metrics on hand-computed toy cases, and the report files of the harness."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from triage_model import evaluate as ev
from triage_model.baselines import detector_for
from triage_model.checkpoint import Detector, make_checkpoint
from triage_model.scoring import ScoringConfig


def test_metric_toys():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert ev.roc_auc(y, s) == pytest.approx(0.75)
    assert ev.average_precision(y, s) == pytest.approx((1 + 2 / 3) / 2)
    assert ev.roc_auc(np.zeros(3), np.arange(3)) is None  # one class only
    assert ev.aupr_trapz(np.array([0, 1]), np.array([0.0, 1.0])) == pytest.approx(1.0)
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 1, 0], bool)
    assert ev.dice(a, b) == pytest.approx(0.5)
    assert ev.dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    d, t = ev.best_dice(np.array([0, 1, 1, 0], bool), np.array([0.1, 0.9, 0.8, 0.85]))
    assert d == pytest.approx(0.8) and t == pytest.approx(0.8)  # {0.9,0.85,0.8}: 2*2/(3+2)


def _case(i: int, abnormal: bool, size: int = 16) -> ev.EvalCase:
    rng = np.random.default_rng(i)
    x = np.full((4, size, size), 0.4, np.float32) + rng.normal(0, 0.01, (4, size, size)).astype(np.float32)
    brain = np.zeros_like(x, bool)
    brain[:, 2:-2, 2:-2] = True
    lesion = np.zeros_like(brain)
    if abnormal:
        lesion[1, 5:9, 5:9] = True
        x[lesion] = 0.75
    return ev.EvalCase(f"c{i}", "intraparenchymal_haemorrhage" if abnormal else "normal", x,
                       brain, lesion, subtle=False, hu=x * 80.0)


def test_harness_on_hu_threshold(tmp_path: Path):
    ck = make_checkpoint("hu_threshold", hu={"hi": 0.6, "top": 0.98, "hu_lo": 50.0, "hu_hi": 100.0},
                         scoring=ScoringConfig(smooth_sigma=0.0), input_size=16,
                         thresholds={"max": 0.5, "topk_mean": 0.2}, pixel_threshold=0.5)
    det = detector_for(ck, device="cpu")
    cases = [_case(i, i % 2 == 1) for i in range(6)]
    doc = ev.evaluate([det], cases, tmp_path, progress=False)
    r = doc["results"][0]
    assert r["slice"]["auroc"] == pytest.approx(1.0) and r["series_max"]["auroc"] == pytest.approx(1.0)
    assert r["pixel"]["dice_at_5fpr"] == pytest.approx(1.0)
    assert r["pixel"]["best_dice_upper_bound"] == pytest.approx(1.0)
    op = r["operating_point"]
    assert op["sensitivity"] == 1.0 and op["specificity"] == 1.0
    assert op["per_family_sensitivity"]["intraparenchymal_haemorrhage"] == {
        "detected": 3, "n": 3, "sensitivity": 1.0}
    for f in ("table.md", "results.json", "roc.png", "pr.png", "contact_sheet.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert "| HU threshold | 1.000 |" in (tmp_path / "table.md").read_text()
    j = json.loads((tmp_path / "results.json").read_text())
    assert len(j["results"][0]["series_scores"]) == 6 and j["cases"][1]["n_lesion_slices"] == 1


def test_harness_multitask_adds_single_term_rows(tmp_path: Path):
    from triage_model.network import MultitaskVAE, NetConfig

    net = MultitaskVAE(NetConfig(input_size=16, base_channels=4, max_channels=8, z_dim=4,
                                 geo_hidden=8))
    det = Detector(make_checkpoint("multitask", net=net, thresholds={"max": 0.0}), device="cpu")
    cases = [_case(i, i % 2 == 1) for i in range(4)]
    doc = ev.evaluate([det], cases, tmp_path, progress=False)
    names = [r["name"] for r in doc["results"]]
    assert len(names) == 3 and names[1].endswith("λ=0") and names[2].endswith("λ=1")
    assert doc["results"][1]["operating_point"]["sensitivity"] is None
    assert "—" in (tmp_path / "table.md").read_text()
