"""The operating point: one threshold rule, one verdict rule, one priority rule, and a configured
threshold that differs from the model file's is reported, never applied silently."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from triage_model.checkpoint import make_checkpoint, save_checkpoint
from triage_model.network import NetConfig, build_network
from triage_model.scoring import ScoringConfig

from triage_agent.app import Model
from triage_agent.cli import main
from triage_agent.config import AgentConfig, PriorityBand, TriageConfig
from triage_agent.operating_point import OperatingPoint
from triage_agent.publish import priority_for

REPO = Path(__file__).resolve().parent.parent
S = 32


def _bands() -> list[PriorityBand]:
    return [PriorityBand(name="urgent", above_threshold=4.0),
            PriorityBand(name="high", above_threshold=0.0)]


def test_model_threshold_applies_unless_the_config_sets_one() -> None:
    op = OperatingPoint.resolve(TriageConfig(priority_bands=_bands()), 4.0)
    assert (op.threshold, op.source, op.mismatch) == (4.0, "model", None)
    assert [op.verdict(s) for s in (None, 3.99, 4.0)] == ["not_assessable", "normal", "abnormal"]
    assert [op.priority(s) for s in (None, 3.0, 4.0, 7.99, 8.0)] == [
        "routine", "routine", "high", "high", "urgent"]

    cfg = TriageConfig(threshold=19.99, priority_bands=_bands())
    op = OperatingPoint.resolve(cfg, 4.0)
    assert (op.threshold, op.source) == (19.99, "config")
    assert op.mismatch is not None and "19.99" in op.mismatch and "overrides" in op.mismatch
    assert op.priority(21.0) == "high" and op.verdict(10.0) == "normal"
    # the same value (as calibrate --write rounds it) is no mismatch
    assert OperatingPoint.resolve(TriageConfig(threshold=4.000001), 4.0).mismatch is None
    # score --model FILE and --threshold
    assert OperatingPoint.resolve(cfg, 4.0, use_config_threshold=False).threshold == 4.0
    assert OperatingPoint.resolve(cfg, 4.0, override=2.5).source == "command line"


def test_publish_priority_is_the_operating_points() -> None:
    cfg = AgentConfig(triage=TriageConfig(priority_bands=_bands()))
    for score in (None, 1.0, 5.0, 9.5):
        assert priority_for(score, cfg, 5.0) == OperatingPoint(5.0, tuple(_bands())).priority(score)


def test_node_warns_at_start_when_the_config_overrides_the_model_threshold(caplog) -> None:  # type: ignore[no-untyped-def]
    det = SimpleNamespace(threshold_for=lambda agg: 4.337)
    model = Model("m", "1", "0" * 64, det)
    with caplog.at_level(logging.WARNING, logger="triage_agent.app"):
        model.scorer(AgentConfig(triage=TriageConfig(threshold=19.99)))
    assert any("19.99" in r.getMessage() and "4.337" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="triage_agent.app"):
        model.scorer(AgentConfig())
    assert not caplog.records


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    net = build_network(NetConfig(input_size=S, base_channels=4, max_channels=16, arch="unet",
                                  geo_head=False, unet_levels=3))
    ck = make_checkpoint("dae", net=net, input_size=S, scoring=ScoringConfig(rec_q=0.05),
                         thresholds={"max": 1234.5, "topk_mean": 1000.0})
    out = tmp_path_factory.mktemp("op") / "site.pt"
    save_checkpoint(ck, out)
    return out


def _config(tmp_path: Path, weights: Path, threshold: float | None) -> Path:
    cfg = tmp_path / "agent.toml"
    shutil.copy(REPO / "agent.toml", cfg)
    text = cfg.read_text()
    text = text.replace("[model]\n", f'[model]\nweights = "{weights}"\n', 1)
    if threshold is not None:
        text = text.replace("[triage]\n", f"[triage]\nthreshold = {threshold}\n", 1)
    cfg.write_text(text)
    return cfg


def test_check_config_reports_a_stale_threshold(model_file: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = _config(tmp_path, model_file, 4.337)
    assert main(["check-config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "warning" in out and "4.337" in out and "1234.5" in out and "site.pt" in out
    cfg = _config(tmp_path, model_file, None)
    assert main(["check-config", str(cfg)]) == 0
    assert "warning" not in capsys.readouterr().out
    missing = _config(tmp_path, tmp_path / "gone.pt", None)
    assert main(["check-config", str(missing)]) == 2
    assert "gone.pt" in capsys.readouterr().err


def test_score_with_model_uses_that_files_threshold(model_file: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    data = tmp_path / "synth"
    assert main(["synth", str(data), "--normals", "1", "--abnormals", "0", "--seed", "5",
                 "--matrix", "128"]) == 0
    capsys.readouterr()
    cfg = _config(tmp_path, REPO / "nonexistent.pt", 0.5)
    assert main(["score", str(data), "--model", str(model_file), "--json", "--config",
                 str(cfg), "--device", "cpu"]) == 0
    out = capsys.readouterr()
    rec = json.loads(out.out.splitlines()[0])
    assert rec["threshold"] == pytest.approx(1234.5) and rec["verdict"] == "normal"
    assert "not used with --model" in out.err
