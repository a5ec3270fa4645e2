"""`triage-agent calibrate`: operating points from a site's series, threshold written to the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from triage_model.thresholds import threshold_for_specificity

from tests.test_model_e2e import tiny_ckpt  # noqa: F401  (module-scoped fixture)
from triage_agent.cli import main
from triage_agent.commands.calibrate import operating_points
from triage_agent.config import load_config

REPO = Path(__file__).resolve().parent.parent


def test_threshold_for_specificity_keeps_that_share_of_normals_below() -> None:
    rng = np.random.default_rng(0)
    normal = rng.normal(0, 1, 200)
    for spec in (0.8, 0.9, 0.95, 0.99):
        t = threshold_for_specificity(normal, spec)
        assert np.mean(normal < t) >= spec
        assert np.mean(normal < t) < spec + 0.01  # not needlessly high
    rows = operating_points(normal, rng.normal(3, 1, 50), prevalence=0.2)
    sens = [r["sensitivity"] for r in rows]
    assert sens == sorted(sens, reverse=True)  # stricter threshold, lower sensitivity


def test_calibrate_prints_table_and_writes_threshold(tiny_ckpt: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    data = tmp_path / "synth"
    assert main(["synth", str(data), "--normals", "6", "--abnormals", "3", "--seed", "31",
                 "--matrix", "128"]) == 0
    cfg = tmp_path / "agent.toml"
    shutil.copy(REPO / "agent.toml", cfg)
    rc = main(["calibrate", "--config", str(cfg), "--labelled", str(data), "--model",
               str(tiny_ckpt), "--target-specificity", "0.8", "--write"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "6 normal, 3 abnormal" in out and "<- target" in out
    assert "sensitivity" in out and "flags/100" in out
    written = load_config(cfg).triage.threshold
    assert written is not None and f"{written:.6g}" in out
    text = cfg.read_text()
    assert "# Weight of the reconstruction score" in text  # admins' comments survive
    assert main(["check-config", str(cfg)]) == 0


def test_calibrate_refuses_too_few_normals(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "empty").mkdir()
    assert main(["calibrate", "--config", str(REPO / "agent.toml"), "--normal",
                 str(tmp_path / "empty")]) == 2
    assert "at least 5" in capsys.readouterr().err
