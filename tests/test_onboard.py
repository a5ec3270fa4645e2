"""`triage-agent onboard`: from a site's normal series to a model file the node uses, with a report."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from triage_model.checkpoint import load_detector, make_checkpoint, read_checkpoint, save_checkpoint
from triage_model.network import NetConfig, build_network
from triage_model.scoring import ScoringConfig
from triage_model.thresholds import threshold_for_specificity

from tests.factories import make_series
from triage_agent.cli import main
from triage_agent.onboarding import OnboardingError, split

REPO = Path(__file__).resolve().parent.parent
S = 32


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """A tiny denoising U-Net, six synthetic normal series and one scout the node would skip."""
    root = tmp_path_factory.mktemp("site")
    torch.manual_seed(0)
    net = build_network(NetConfig(input_size=S, base_channels=4, max_channels=16, arch="unet",
                                  geo_head=False, unet_levels=3))
    model = root / "base.pt"
    save_checkpoint(make_checkpoint("dae", net=net, input_size=S,
                                    scoring=ScoringConfig(rec_q=0.05),
                                    thresholds={"max": 0.5, "topk_mean": 0.4}), model)
    normals = root / "normals"
    assert main(["synth", str(normals), "--normals", "6", "--abnormals", "0", "--seed", "41",
                 "--matrix", "128"]) == 0
    make_series(normals / "scout", n=3, seed=9, size=64, description="SCOUT HEAD")
    cfg = root / "agent.toml"
    shutil.copy(REPO / "agent.toml", cfg)
    return {"model": model, "normals": normals, "config": cfg, "root": root}


def test_onboard_writes_a_model_the_node_uses_and_a_report(site: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    out = site["root"] / "site" / "site.pt"
    # a threshold left over from the model before: reported, and not used by score --model
    cfg = site["root"] / "stale.toml"
    cfg.write_text(site["config"].read_text().replace("[triage]\n", "[triage]\nthreshold = 99.0\n",
                                                      1))
    capsys.readouterr()
    assert main(["onboard", "--normal", str(site["normals"]), "--out", str(out), "--config",
                 str(cfg), "--model", str(site["model"]), "--seed", "3"]) == 0
    msg = capsys.readouterr()
    assert "atlas refitted on 4 normal series" in msg.out and "2 held-out" in msg.out
    assert "series description matches exclusion" in msg.err  # the scout, with its reason
    assert "only 4 normal series to fit the atlas on" in msg.err
    assert "read normals" in msg.err and "score normals" in msg.err  # progress bars
    assert "[triage] threshold = 99" in msg.err and "remove it" in msg.err

    ck, _ = read_checkpoint(out)
    det = load_detector(out, device="cpu")
    assert det.atlas is not None and det.atlas.n_series == 4
    assert det.atlas.height == "brain_volume"  # bands of height in the head
    assert ck["calibration"]["val_series"] == 2
    on = ck["training"]["onboarding"]
    assert (on["fit_series"], on["calibration_series"], on["skipped_series"]) == (4, 2, 1)
    assert on["base_model"]["file"] == "base.pt"
    # the one threshold rule, at [triage] target_specificity, on the held-out series
    assert det.threshold == threshold_for_specificity(ck["calibration"]["val_series_scores_max"],
                                                      0.95)

    report = out.with_name("site.pt.report.md").read_text()
    for heading in ("## Operating point", "## Where the normals' top slices lie", "## Warnings",
                    "## Skipped series", "flags per 100 normal studies"):
        assert heading in report
    assert "only 2 held-out normal series" in report
    for png in ("site.pt.report-scores.png", "site.pt.report-heights.png"):
        assert out.with_name(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in report
    assert "CANARY" not in report and "CANARY" not in msg.out + msg.err

    # score --model FILE scores at the file's threshold, whatever [triage] threshold says
    assert main(["score", str(site["normals"]), "--model", str(out), "--json", "--config",
                 str(cfg), "--device", "cpu"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    scored = [r for r in recs if r["score"] is not None]
    assert len(scored) == 6
    assert all(r["threshold"] == pytest.approx(det.threshold) for r in scored)
    # the node scores the held-out series as the calibration did (the same heights, atlas and
    # normalisation; the calibration read the maps in float16)
    for held in ck["calibration"]["val_series_scores_max"]:
        assert min(abs(r["score"] - held) for r in scored) < 0.01  # float16 maps and atlas


def test_onboard_refuses_bad_input(site: dict[str, Path], tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = str(site["config"])
    assert main(["onboard", "--normal", str(site["normals"]), "--out", str(site["model"]),
                 "--model", str(site["model"]), "--config", cfg]) == 2
    assert "new file" in capsys.readouterr().err
    assert main(["onboard", "--normal", str(tmp_path), "--out", str(tmp_path / "o.pt"),
                 "--config", cfg]) == 2
    assert "no DICOM series" in capsys.readouterr().err
    assert main(["onboard", "--normal", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "o.pt"), "--config", cfg]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


def test_onboard_without_the_train_extra_says_what_to_install(
        tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert main(["onboard", "--normal", str(tmp_path), "--out", str(tmp_path / "x.pt")]) == 2
    assert "pip install 'triage-agent[train]'" in capsys.readouterr().err


def test_split_is_seeded_by_series_about_two_thirds_to_one_third() -> None:
    fit, held = split(60, 1 / 3, seed=0)
    assert (len(fit), len(held)) == (40, 20) and not set(fit) & set(held)
    assert split(60, 1 / 3, seed=0) == (fit, held) and split(60, 1 / 3, seed=1) != (fit, held)
    assert split(2, 0.9, 0) == ([int(np.setdiff1d([0, 1], split(2, 0.9, 0)[1])[0])],
                                split(2, 0.9, 0)[1])
    with pytest.raises(OnboardingError, match="at least 2"):
        split(1, 1 / 3, 0)
    with pytest.raises(OnboardingError, match="between 0 and 1"):
        split(10, 1.5, 0)


def test_onboard_from_pacs_onboards_from_what_retrieve_returns(
        site: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    retrieve = pytest.importorskip("triage_agent.retrieve")
    calls = []

    def fake(cfg, csv_path, out_dir, progress=True):  # type: ignore[no-untyped-def]
        calls.append((Path(csv_path), Path(out_dir)))
        raise retrieve.RetrieveError("PACS 127.0.0.1:1 refused the association")

    monkeypatch.setattr(retrieve, "retrieve_normals", fake)
    studies = tmp_path / "studies.csv"
    studies.write_text("1.2.3\n")
    out = tmp_path / "site.pt"
    assert main(["onboard", "--from-pacs", str(studies), "--out", str(out), "--config",
                 str(site["config"])]) == 2
    assert "refused the association" in capsys.readouterr().err
    assert calls == [(studies, tmp_path / "site.pt.normals")]
    monkeypatch.setattr(retrieve, "retrieve_normals", lambda *a, **k: [])
    assert main(["onboard", "--from-pacs", str(studies), "--out", str(out), "--config",
                 str(site["config"])]) == 2
    assert "no DICOM series" in capsys.readouterr().err
    assert main(["onboard", "--out", str(out), "--config", str(site["config"])]) == 2
    assert "--from-pacs" in capsys.readouterr().err


def test_atlas_part_of_thin_slice_series_is_subsampled_with_whole_series_heights(
        site: dict[str, Path]) -> None:
    from triage_model.atlas import plain_detector
    from triage_model.scoring import slice_heights

    from triage_agent.inference import find_series
    from triage_agent.onboarding import measure

    uid, files = sorted(find_series([site["normals"]]).items())[0]
    det = plain_detector(read_checkpoint(site["model"])[0], "cpu")
    whole = measure({uid: files}, det)
    n = len(whole)
    part = measure({uid: files}, det, max_slices=8)
    assert n > 8 and len(part) == 8
    np.testing.assert_allclose(part.heights[[0, -1]], slice_heights(n)[[0, -1]])
    np.testing.assert_allclose(whole.heights, slice_heights(n))


def test_onboard_fine_tunes_the_network_on_the_fit_part_when_asked(
        site: dict[str, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    out = site["root"] / "tuned" / "site.pt"
    capsys.readouterr()
    assert main(["onboard", "--normal", str(site["normals"]), "--out", str(out), "--config",
                 str(site["config"]), "--model", str(site["model"]), "--seed", "3",
                 "--fine-tune-steps", "3"]) == 0
    msg = capsys.readouterr()
    assert "network fine-tuned (3 steps) and atlas refitted on 4 normal series" in msg.out
    assert "fine-tune the network" in msg.err  # its progress bar
    base, _ = read_checkpoint(site["model"])
    ck, _ = read_checkpoint(out)
    assert any(not torch.equal(v, base["state_dict"][k]) for k, v in ck["state_dict"].items())
    assert ck["training"]["fine_tune"]["series"] == 4  # the fit part only, not the held-out
    assert ck["training"]["onboarding"]["fine_tune_steps"] == 3
    report = out.with_name("site.pt.report.md").read_text()
    assert "fine-tuned on the 4 fit series for 3 steps" in report
    # the held-out "before" scores are the model as it came: the same as without fine-tuning
    plain = site["root"] / "plain" / "site.pt"
    assert main(["onboard", "--normal", str(site["normals"]), "--out", str(plain), "--config",
                 str(site["config"]), "--model", str(site["model"]), "--seed", "3",
                 "--fine-tune-steps", "0"]) == 0
    assert "network fine-tuned" not in capsys.readouterr().out
    p, _ = read_checkpoint(plain)
    assert all(torch.equal(v, base["state_dict"][k]) for k, v in p["state_dict"].items())
    assert (p["training"]["onboarding"]["flags_per_100_normals_before"]
            == ck["training"]["onboarding"]["flags_per_100_normals_before"])
    assert "as it came (not fine-tuned)" in plain.with_name("site.pt.report.md").read_text()
    assert main(["onboard", "--normal", str(site["normals"]), "--out", str(out), "--config",
                 str(site["config"]), "--fine-tune-steps", "-1"]) == 2
    assert "--fine-tune-steps must be 0" in capsys.readouterr().err


def test_onboard_help_states_the_fine_tune_default(capsys) -> None:  # type: ignore[no-untyped-def]
    from triage_agent.onboarding import FINE_TUNE_STEPS

    with pytest.raises(SystemExit):
        main(["onboard", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {FINE_TUNE_STEPS}" in text
