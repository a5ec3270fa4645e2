"""``triage-agent score`` applies the node's selection rules: what the node would skip (an MR, a
chest CT, a sagittal reformat) is printed as skipped with the reason, not scored; the admin who
wants a score anyway asks for it with ``--no-selection``."""

from __future__ import annotations

import json
from pathlib import Path

from tests.factories import make_series
from tests.test_model_e2e import _write_phantom_series, tiny_ckpt  # noqa: F401  (fixture)
from triage_agent.cli import main


def test_score_skips_what_the_node_would_skip(tiny_ckpt: Path, tmp_path: Path,  # noqa: F811
                                              capsys) -> None:  # type: ignore[no-untyped-def]
    head = _write_phantom_series(tmp_path / "in" / "head", n=24)
    make_series(tmp_path / "in" / "mr", n=24, seed=1, size=64, modality="MR")
    make_series(tmp_path / "in" / "chest", n=24, seed=2, size=64, description="CHEST W/O")
    for ds_dir in ("chest",):  # a chest CT says so in BodyPartExamined
        import pydicom

        for f in (tmp_path / "in" / ds_dir).glob("*.dcm"):
            ds = pydicom.dcmread(f)
            ds.BodyPartExamined = "CHEST"
            ds.save_as(f)
    make_series(tmp_path / "in" / "sag", n=24, seed=3, size=64, orientation="sagittal")
    make_series(tmp_path / "in" / "short", n=5, seed=4, size=64)
    args = ["score", str(tmp_path / "in"), "--model", str(tiny_ckpt), "--json",
            "--config", str(tmp_path / "absent.toml")]

    assert main(args) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    reasons = {d["reason"] for d in out if d["verdict"] == "skipped"}
    assert reasons == {"modality MR", "body part CHEST", "sagittal reformat",
                       "only 5 slices (minimum 20)"}, out
    (scored,) = [d for d in out if d["verdict"] != "skipped"]
    assert {s["sop_instance_uid"] for s in scored["slices"]} <= set(head)
    assert all(d["score"] is None and d["slices"] == [] for d in out if d["verdict"] == "skipped")

    text_args = [a for a in args if a != "--json"]
    assert main(text_args) == 0
    text = capsys.readouterr().out
    assert text.count("skipped") >= 4 and "modality MR" in text and "--no-selection" in text

    assert main(args + ["--no-selection"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(out) == 5 and not any(d["verdict"] == "skipped" for d in out)
