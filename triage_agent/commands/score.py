"""``triage-agent score PATH... [--model CKPT] [--json]``: score DICOM series from the shell.

Folders are searched recursively and files grouped by SeriesInstanceUID. With ``--json`` one JSON
object per line and series: series_instance_uid, score, verdict, threshold, reason, slices.
[model] and [triage] of agent.toml apply when the file exists; defaults otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from triage_agent.cli import add_config_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score DICOM series with the detector")
    p.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders (recursive)")
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint (default: [model] weights, else the bundled weights)")
    p.add_argument("--json", action="store_true", help="one JSON line per series")
    p.add_argument("--lambda", dest="lambda_", type=float, default=None)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--aggregate", choices=["max", "topk_mean"], default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    add_config_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from triage_model.checkpoint import CheckpointError, load_detector

    from triage_agent.config import AgentConfig, ConfigError, load_config
    from triage_agent.inference import find_series, score_series

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
    thr = args.threshold if args.threshold is not None else cfg.triage.threshold
    try:
        groups = find_series(args.paths)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not groups:
        print("error: no DICOM series found", file=sys.stderr)
        return 1
    for uid, files in sorted(groups.items()):
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
