"""``triage-agent calibrate``: pick the operating threshold from a site's own series.

Scores normal (and, if given, abnormal) series with the configured model and aggregation, prints
an operating-point table and, with ``--write``, puts the threshold for the target specificity into
``agent.toml`` (comments kept). A running node picks it up on SIGHUP (`systemctl reload`).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from triage_agent.commands._common import add_config_argument, config_or_exit

if TYPE_CHECKING:  # numpy is imported where it is used: `--help` stays quick
    import numpy as np

SPECIFICITIES = (0.80, 0.85, 0.90, 0.95, 0.975, 0.99)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="operating-point table and threshold from your series")
    add_config_argument(p)
    p.add_argument("--normal", nargs="*", default=[], metavar="DIR",
                   help="folders of normal series (searched recursively)")
    p.add_argument("--abnormal", nargs="*", default=[], metavar="DIR",
                   help="folders of abnormal series (optional: adds sensitivity)")
    p.add_argument("--labelled", nargs="*", default=[], metavar="DIR",
                   help="folders with a labels.csv (series_instance_uid,label) as written by "
                        "`triage-agent synth`")
    p.add_argument("--target-specificity", type=float, default=None,
                   help="share of normal series to keep below the threshold "
                        "(default: [triage] target_specificity, 0.95)")
    p.add_argument("--prevalence", type=float, default=0.2,
                   help="share of abnormal studies at your site, for expected flags (default 0.2)")
    p.add_argument("--model", default=None,
                   help="model file to calibrate (default: [model] weights)")
    p.add_argument("--write", action="store_true",
                   help="set [triage] threshold in the config file")
    p.set_defaults(func=run)


def operating_points(normal: np.ndarray, abnormal: np.ndarray, prevalence: float,
                     targets: tuple[float, ...] = SPECIFICITIES) -> list[dict[str, float | None]]:
    import numpy as np
    from triage_model.thresholds import threshold_for_specificity

    rows: list[dict[str, float | None]] = []
    for target in targets:
        t = threshold_for_specificity(normal, target)
        spec = float(np.mean(normal < t))
        sens = float(np.mean(abnormal >= t)) if len(abnormal) else None
        flags = 100 * ((1 - prevalence) * (1 - spec) + prevalence * (sens if sens is not None
                                                                      else 0.0))
        rows.append({"target": target, "threshold": t, "specificity": spec,
                     "sensitivity": sens, "flags_per_100": flags if sens is not None else
                     100 * (1 - spec)})
    return rows


NOT_FITTING = ("the model does not fit this site's images: run `triage-agent onboard --normal "
               "DIR --out FILE` to adapt it to this site's normal series")


def range_warnings(normal: np.ndarray, abnormal: np.ndarray, threshold: float,
                   model_threshold: float, model_target: float) -> list[str]:
    """Plain warnings when the model is out of its range at this site: the new threshold lies
    above most abnormal series, or the site's normals score far above the model's own
    calibration (more than half of them at or above the threshold calibrated into the file,
    which was set to flag ``1 - model_target`` of normals)."""
    import numpy as np

    out = []
    if len(abnormal):
        above = int(np.sum(abnormal >= threshold))
        if above * 2 < len(abnormal):
            which = "all" if above == 0 else "most"
            out.append(f"the threshold {threshold:.4g} lies above {which} of the {len(abnormal)} "
                       f"abnormal series ({above} would be flagged); {NOT_FITTING}")
    high = int(np.sum(normal >= model_threshold))
    if len(normal) and high * 2 > len(normal):
        out.append(f"{high} of {len(normal)} normal series score at or above the model's own "
                   f"threshold {model_threshold:.4g} (calibrated to flag about "
                   f"{100 * (1 - model_target):.0f} in 100 normal series); {NOT_FITTING}")
    return out


def _series_under(dirs: list[str]) -> dict[str, list[Path]]:
    from triage_agent.inference import find_series

    return find_series([Path(d) for d in dirs]) if dirs else {}


def run(args: argparse.Namespace) -> int:
    cfg = config_or_exit(args.config)
    import numpy as np
    from triage_model.checkpoint import load_detector
    from triage_model.thresholds import threshold_for_specificity

    from triage_agent.inference import score_series

    normal = _series_under(args.normal)
    abnormal = _series_under(args.abnormal)
    for d in args.labelled:
        labels_path = Path(d) / "labels.csv"
        if not labels_path.exists():
            print(f"error: {labels_path} not found", file=sys.stderr)
            return 2
        with labels_path.open() as f:
            labels = {r["series_instance_uid"]: r["label"] for r in csv.DictReader(f)}
        for uid, files in _series_under([d]).items():
            if uid in labels:
                (normal if labels[uid] == "normal" else abnormal)[uid] = files
    if len(normal) < 5:
        print(f"error: {len(normal)} normal series found; calibration needs at least 5 "
              "(20+ recommended)", file=sys.stderr)
        return 2
    det = load_detector(args.model or cfg.model.weights, device=cfg.model.device)
    t = cfg.triage
    target = t.target_specificity if args.target_specificity is None else args.target_specificity
    if not 0.0 < target < 1.0:
        print(f"error: --target-specificity must be between 0 and 1, got {target}",
              file=sys.stderr)
        return 2

    def scores(group: dict[str, list[Path]], name: str) -> np.ndarray:
        out = []
        for i, files in enumerate(group.values(), 1):
            r = score_series(files, det, lambda_=t.lambda_, aggregate=t.aggregate, top_k=t.top_k,
                             batch_size=cfg.model.batch_size)
            if r.score is not None:
                out.append(r.score)
            print(f"\rscoring {name} series {i}/{len(group)}", end="", file=sys.stderr,
                  flush=True)
        if group:
            print(file=sys.stderr)
        return np.asarray(out, dtype=float)

    n_scores, a_scores = scores(normal, "normal"), scores(abnormal, "abnormal")
    if len(n_scores) < 5:
        print(f"error: only {len(n_scores)} normal series could be scored; calibration needs at "
              "least 5", file=sys.stderr)
        return 2
    print(f"model {det.name} {det.version}; {len(n_scores)} normal, {len(a_scores)} abnormal "
          f"assessable series; aggregate {t.aggregate}; lambda {t.lambda_}")
    print(f"{'target spec':>11} {'threshold':>10} {'specificity':>11} {'sensitivity':>11} "
          f"{'flags/100':>9}")
    rows = operating_points(n_scores, a_scores, args.prevalence,
                            tuple(sorted(set(SPECIFICITIES) | {target})))
    for r in rows:
        sens = "-" if r["sensitivity"] is None else f"{r['sensitivity']:.3f}"
        mark = "  <- target" if r["target"] == target else ""
        print(f"{r['target']:>11.3f} {r['threshold']:>10.4f} {r['specificity']:>11.3f} "
              f"{sens:>11} {r['flags_per_100']:>9.1f}{mark}")
    print(f"flags/100 assumes {args.prevalence:.0%} abnormal studies"
          + ("" if len(a_scores) else " and counts false positives only (no abnormal series)"))
    chosen = threshold_for_specificity(n_scores, target)
    model_target = float((det.ckpt.get("calibration") or {}).get("target_specificity", 0.95))
    for warning in range_warnings(n_scores, a_scores, chosen, det.threshold_for(t.aggregate),
                                  model_target):
        print(f"warning: {warning}", file=sys.stderr)
    if args.write:
        write_threshold(Path(args.config), chosen)
        print(f"wrote [triage] threshold = {chosen:.6g} to {args.config}; reload a running node "
              "with SIGHUP (systemctl reload triage-agent). It overrides the threshold "
              f"{det.threshold_for(t.aggregate):.6g} calibrated into the model file, and the node "
              "and check-config say so; remove it when you switch models")
    else:
        print(f"threshold for specificity {target}: {chosen:.6g} "
              "(use --write to put it in the config)")
    return 0


def write_threshold(path: Path, threshold: float) -> None:
    import tomlkit

    doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    if "triage" not in doc:
        doc["triage"] = tomlkit.table()
    doc["triage"]["threshold"] = round(threshold, 6)  # type: ignore[index]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(tomlkit.dumps(doc), encoding="utf-8")
    tmp.replace(path)
