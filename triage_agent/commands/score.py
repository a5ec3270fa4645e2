"""``triage-agent score PATH... [--model CKPT] [--json]``: score DICOM series from the shell.

Folders are searched recursively and files grouped by SeriesInstanceUID. With ``--json`` one JSON
object per line and series: series_instance_uid, score, verdict, threshold, reason, slices.
[model] and [triage] of agent.toml apply when the file exists; defaults otherwise. The threshold
is the model file's calibrated one, unless ``--threshold`` or (without ``--model``) ``[triage]
threshold`` sets another. Series the node's ``[series]`` rules would skip (an MR, a chest CT, a
reformat, and with ``report = "one_per_study"`` every series of a study but the one the study
rule chooses) are printed as ``skipped`` with the reason and not scored, unless
``--no-selection``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from triage_agent.commands._common import add_config_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score DICOM series with the detector")
    p.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders (recursive)")
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint (default: [model] weights, else the bundled weights)")
    p.add_argument("--json", action="store_true", help="one JSON line per series")
    p.add_argument("--lambda", dest="lambda_", type=float, default=None,
                   help="weight of the reconstruction term (default: [triage] lambda)")
    p.add_argument("--threshold", type=float, default=None,
                   help="operating threshold (default: with --model, that file's calibrated "
                        "threshold; else [triage] threshold, else the model's)")
    p.add_argument("--aggregate", choices=["max", "topk_mean"], default=None,
                   help="series score from slice scores (default: [triage] aggregate)")
    p.add_argument("--top-k", type=int, default=None,
                   help="slices averaged by topk_mean (default: [triage] top_k)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                   help="where the model runs (default: [model] device)")
    p.add_argument("--no-selection", action="store_true",
                   help="score every series, also those the node's [series] rules would skip "
                        "(another modality, body part, orientation, too few slices, or not "
                        "the series chosen for its study)")
    add_config_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from triage_model.checkpoint import CheckpointError, load_detector

    from triage_agent.config import AgentConfig, ConfigError, load_config
    from triage_agent.inference import find_series, score_series
    from triage_agent.operating_point import OperatingPoint, thresholds_differ
    from triage_agent.selection import skip_reasons

    cfg = AgentConfig()
    if args.config and Path(args.config).exists():
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    weights = args.model or cfg.model.weights
    try:
        det = load_detector(weights, device=args.device or cfg.model.device)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lam = cfg.triage.lambda_ if args.lambda_ is None else args.lambda_
    agg = args.aggregate or cfg.triage.aggregate
    top_k = args.top_k or cfg.triage.top_k
    triage = cfg.triage.model_copy(update={"aggregate": agg})
    # --model FILE scores at FILE's own threshold; [model] weights at the configured one
    op = OperatingPoint.resolve(triage, det.threshold_for(agg), override=args.threshold,
                                use_config_threshold=args.model is None)
    if op.mismatch:
        print(f"warning: {op.mismatch}", file=sys.stderr)
    elif (args.model is not None and args.threshold is None and cfg.triage.threshold is not None
          and thresholds_differ(cfg.triage.threshold, op.threshold)):
        print(f"note: scoring at {args.model.name}'s threshold {op.threshold:.6g}; "
              f"[triage] threshold = {cfg.triage.threshold:.6g} in {args.config} is not used "
              "with --model", file=sys.stderr)
    thr = op.threshold
    try:
        groups = find_series(args.paths)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not groups:
        print("error: no DICOM series found", file=sys.stderr)
        return 1
    reasons = {} if args.no_selection else skip_reasons(groups, cfg.series)
    for uid, files in sorted(groups.items()):
        reason = reasons.get(uid)
        if reason is not None:
            if args.json:
                print(json.dumps({"series_instance_uid": uid, "score": None,
                                  "verdict": "skipped", "threshold": thr, "reason": reason,
                                  "slices": []}), flush=True)
            else:
                print(f"{uid}  {'skipped':<15} {reason} (the node would not score it; "
                      "--no-selection scores it anyway)", flush=True)
            continue
        res = score_series(files, det, lambda_=lam, threshold=thr, aggregate=agg, top_k=top_k,
                           batch_size=cfg.model.batch_size)
        if res.series_instance_uid is None:
            res.series_instance_uid = uid
        if args.json:
            print(json.dumps(res.to_json()), flush=True)
        else:
            s = "n/a" if res.score is None else f"{res.score:.3f}"
            extra = f" ({res.reason})" if res.reason else ""
            print(f"{uid}  {res.verdict:<15} score {s}  threshold {res.threshold:.3f}  "
                  f"{len(res.slices)} slices{extra}", flush=True)
    return 0
