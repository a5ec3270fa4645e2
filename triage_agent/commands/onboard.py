"""``triage-agent onboard --normal DIR [DIR ...] --out FILE``: a site model from its normal series.

Reads the site's normal head-CT series (folders searched recursively, as ``calibrate --normal``
finds them), keeps those the node's selection rules accept, refits the residual atlas on about
2/3 of them and calibrates the normalisation and the threshold at ``[triage] target_specificity``
on the rest. Writes FILE (a model file for ``[model] weights`` and ``score --model``) and
FILE.report.md with its plots next to it. See ``triage_agent.onboarding``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from triage_agent.commands._common import add_config_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "onboard", help="adapt the detector to this site from its normal series",
        description="Refit the detector's residual atlas on a site's normal series and "
                    "calibrate its threshold on held-out ones; writes a model file and a report.")
    p.add_argument("--normal", nargs="+", default=[], metavar="DIR",
                   help="folders of normal head-CT series (searched recursively); 60 or more "
                        "series recommended")
    p.add_argument("--from-pacs", type=Path, default=None, metavar="STUDIES.csv",
                   help="also retrieve these normal studies (StudyInstanceUID or "
                        "AccessionNumber per line) from the configured PACS with C-GET")
    p.add_argument("--retrieve-dir", type=Path, default=None, metavar="DIR",
                   help="with --from-pacs: where the retrieved series go "
                        "(default: FILE.normals/ next to --out)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE",
                   help="the site model file to write (FILE.report.md and plots go next to it)")
    p.add_argument("--model", type=Path, default=None,
                   help="model to start from (default: [model] weights, else the bundled one)")
    p.add_argument("--holdout-fraction", type=float, default=1 / 3, metavar="F",
                   help="share of the normal series held out to calibrate the threshold "
                        "(default 1/3; the rest refit the atlas)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the fit/held-out split and of the fine-tuning")
    p.add_argument("--fine-tune-steps", type=int, default=None, metavar="N",
                   help="fine-tune the network on the fit part of the normals for N steps of 8 "
                        "slices before the atlas is refitted (default 0: off; a GPU is used "
                        "when --device allows)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                   help="where the network runs (default: [model] device; auto = a GPU if any)")
    add_config_argument(p)
    p.set_defaults(func=run)


def _default_steps() -> int:
    from triage_agent.onboarding import FINE_TUNE_STEPS

    return FINE_TUNE_STEPS


def _progress() -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None

    def bar(it: Iterable[Any], desc: str, total: int) -> Iterable[Any]:
        return tqdm(it, desc=desc, total=total, unit="series" if desc.startswith(("read", "score")) else "step",
                    file=sys.stderr, dynamic_ncols=True)

    return bar


def run(args: argparse.Namespace) -> int:
    progress = _progress()
    if progress is None:
        print("error: onboarding needs the training extra: pip install 'triage-agent[train]'",
              file=sys.stderr)
        return 2
    from triage_model.checkpoint import (
        CheckpointError,
        default_weights_path,
        read_checkpoint,
        resolve_device,
        save_checkpoint,
    )

    from triage_agent.config import AgentConfig, ConfigError, load_config
    from triage_agent.inference import find_series
    from triage_agent.onboarding import (
        OnboardingError,
        onboard_checkpoint,
        report_paths,
        write_report,
    )

    cfg = AgentConfig()
    if Path(args.config).exists():
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        print(f"note: {args.config} not found; the default selection rules and [triage] "
              "settings apply", file=sys.stderr)
    steps = _default_steps() if args.fine_tune_steps is None else args.fine_tune_steps
    if steps < 0:
        print("error: --fine-tune-steps must be 0 (off) or more", file=sys.stderr)
        return 2
    if not args.normal and args.from_pacs is None:
        print("error: give --normal DIR [DIR ...] and/or --from-pacs STUDIES.csv",
              file=sys.stderr)
        return 2
    base = args.model or cfg.model.weights or default_weights_path()
    if args.out.exists() and args.out.resolve() == Path(base).resolve():
        print(f"error: --out {args.out} is the model onboarding starts from; write the site "
              "model to a new file", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    normal_dirs = [str(d) for d in args.normal]
    try:
        ckpt, digest = read_checkpoint(base)
        if args.from_pacs is not None:
            retrieved = _from_pacs(cfg, args.from_pacs,
                                   args.retrieve_dir or args.out.with_name(args.out.name
                                                                           + ".normals"))
            if retrieved is None:
                return 2
            normal_dirs += [str(d) for d in retrieved]
        groups = find_series(normal_dirs)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not groups:
        print(f"error: no DICOM series under {' '.join(normal_dirs) or 'the retrieved studies'}",
              file=sys.stderr)
        return 2
    device = resolve_device(args.device or cfg.model.device)
    print(f"onboarding {Path(base).name} on {len(groups)} series on {device}", file=sys.stderr)
    try:
        res = onboard_checkpoint(
            ckpt, groups, series_rules=cfg.series, triage=cfg.triage,
            holdout_fraction=args.holdout_fraction, seed=args.seed, device=str(device),
            batch_size=cfg.model.batch_size, progress=progress, fine_tune_steps=steps,
            source=f"onboard: {len(groups)} normal series (seed {args.seed})")
    except OnboardingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res.ckpt["training"]["onboarding"]["base_model"] = {"file": Path(base).name,
                                                        "sha256": digest}
    new_digest = save_checkpoint(res.ckpt, args.out)
    sources = [str(d) for d in args.normal] + (
        [f"{args.from_pacs} (from the PACS)"] if args.from_pacs is not None else [])
    report = write_report(res, args.out, normal_dirs=sources,
                          elapsed_s=time.monotonic() - t0, device=str(device),
                          base_name=Path(base).name)
    for s in res.skipped:
        print(f"skipped series {s.series}: {s.reason}", file=sys.stderr)
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    tuned = res.ckpt["training"]["onboarding"].get("fine_tune_steps", 0)
    what = f"network fine-tuned ({tuned} steps) and " if tuned else ""
    print(f"wrote {args.out} (sha256 {new_digest[:12]}): {what}atlas refitted on {res.n_fit} normal "
          f"series, threshold {res.threshold_after:.4g} calibrated on {res.n_held} held-out "
          f"series; held-out normals flagged: {res.flags_before:.0f} in 100 before, "
          f"{res.flags_after:.0f} in 100 after")
    plots = [p.name for k, p in report_paths(args.out).items() if k != "report"]
    print(f"report: {report} (plots {', '.join(plots)})")
    print(f"try it: triage-agent score --model {args.out} DIR; use it: [model] weights = "
          f"\"{args.out}\" in {args.config}, then reload the node (SIGHUP)")
    if cfg.triage.threshold is not None:
        print(f"warning: {args.config} sets [triage] threshold = {cfg.triage.threshold:.6g}, "
              f"which would override this file's threshold {res.threshold_after:.6g}: remove "
              "it when you switch to the site model", file=sys.stderr)
    return 0


def _from_pacs(cfg: Any, studies_csv: Path, out_dir: Path) -> list[Path] | None:
    """Folders of the normal series retrieved from the PACS; None (after saying why) when the
    PACS cannot be used."""
    try:
        from triage_agent.retrieve import RetrieveError, retrieve_normals
    except ImportError:
        print("error: --from-pacs is not available in this installation", file=sys.stderr)
        return None
    try:
        return list(retrieve_normals(cfg, studies_csv, out_dir))
    except RetrieveError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
