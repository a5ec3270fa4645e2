"""``triage-agent calibrate``: pick the operating threshold from a site's own series.

Scores normal (and, if given, abnormal) series with the configured model and aggregation, prints
an operating-point table and, with ``--write``, puts the threshold for the target specificity into
``agent.toml`` (comments kept). A running node picks it up on SIGHUP (`systemctl reload`).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np

from triage_agent.cli import add_config_argument
from triage_agent.commands._common import config_or_exit

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
    p.add_argument("--target-specificity", type=float, default=0.95)
    p.add_argument("--prevalence", type=float, default=0.2,
                   help="share of abnormal studies at your site, for expected flags (default 0.2)")
    p.add_argument("--model", default=None, help="checkpoint (default: [model] weights)")
    p.add_argument("--write", action="store_true",
                   help="set [triage] threshold in the config file")
    p.set_defaults(func=run)


def threshold_for_specificity(normal_scores: np.ndarray, specificity: float) -> float:
    """Smallest threshold that keeps at least ``specificity`` of normals below it (score >= t
    is abnormal); midway to the next normal score so that it is not on a data point."""
    s = np.sort(normal_scores)
    k = min(len(s), max(1, math.ceil(specificity * len(s))))
    if k >= len(s):
        return float(s[-1] + max(1e-6, 0.05 * abs(s[-1])))
    return float((s[k - 1] + s[k]) / 2)


def operating_points(normal: np.ndarray, abnormal: np.ndarray, prevalence: float,
                     targets: tuple[float, ...] = SPECIFICITIES) -> list[dict[str, float | None]]:
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


def _series_under(dirs: list[str]) -> dict[str, list[Path]]:
    from triage_agent.inference import find_series

    return find_series([Path(d) for d in dirs]) if dirs else {}


def run(args: argparse.Namespace) -> int:
    cfg = config_or_exit(args.config)
    from triage_model.checkpoint import load_detector

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
    print(f"model {det.name} {det.version}; {len(n_scores)} normal, {len(a_scores)} abnormal "
          f"assessable series; aggregate {t.aggregate}; lambda {t.lambda_}")
    print(f"{'target spec':>11} {'threshold':>10} {'specificity':>11} {'sensitivity':>11} "
          f"{'flags/100':>9}")
    rows = operating_points(n_scores, a_scores, args.prevalence,
                            tuple(sorted(set(SPECIFICITIES) | {args.target_specificity})))
    for r in rows:
        sens = "-" if r["sensitivity"] is None else f"{r['sensitivity']:.3f}"
        mark = "  <- target" if r["target"] == args.target_specificity else ""
        print(f"{r['target']:>11.3f} {r['threshold']:>10.4f} {r['specificity']:>11.3f} "
              f"{sens:>11} {r['flags_per_100']:>9.1f}{mark}")
    print(f"flags/100 assumes {args.prevalence:.0%} abnormal studies"
          + ("" if len(a_scores) else " and counts false positives only (no abnormal series)"))
    chosen = threshold_for_specificity(n_scores, args.target_specificity)
    if args.write:
        write_threshold(Path(args.config), chosen)
        print(f"wrote [triage] threshold = {chosen:.6g} to {args.config}; reload a running node "
              "with SIGHUP (systemctl reload triage-agent)")
    else:
        print(f"threshold for specificity {args.target_specificity}: {chosen:.6g} "
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
