"""``triage-agent synth OUT``: write synthetic head-CT series with lesion masks and labels.

For development, demos and benchmarks only: a site trains on its own normal studies.
Layout: ``OUT/<case_id>/CT0001.dcm...``, ``OUT/<case_id>/mask.npz`` (key ``mask``, (Z, Y, X)
bool in the order ``preprocess.read_series`` returns), ``OUT/<case_id>/case.json`` and
``OUT/labels.csv``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from collections import Counter
from multiprocessing import get_context
from pathlib import Path

log = logging.getLogger(__name__)

LABEL_COLUMNS = (
    "case_id",
    "series_instance_uid",
    "study_instance_uid",
    "label",
    "subtle",
    "seed",
    "n_slices",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write synthetic head-CT DICOM series with lesion masks (development/demo only)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--normals", type=int, default=10, help="number of normal cases")
    p.add_argument("--abnormals", type=int, default=10, help="number of abnormal cases")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (same seed, same files)")
    p.add_argument("--matrix", type=int, default=512, help="in-plane matrix (default 512)")
    p.add_argument(
        "--families",
        default=None,
        help="comma-separated lesion families to cycle through (default: all)",
    )
    p.add_argument(
        "--subtle",
        choices=("auto", "yes", "no"),
        default="auto",
        help="force subtle / obvious lesions (default: drawn per case)",
    )
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.set_defaults(func=run)


def _plan(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    from model.synth import LESION_FAMILIES, make_dataset_plan

    plan = make_dataset_plan(args.normals, args.abnormals, args.seed)
    if args.families:
        fams = [f.strip() for f in args.families.split(",") if f.strip()]
        bad = [f for f in fams if f not in LESION_FAMILIES]
        if bad:
            raise ValueError(
                f"unknown lesion famil{'y' if len(bad) == 1 else 'ies'} {', '.join(bad)}; "
                f"choose from {', '.join(LESION_FAMILIES)}"
            )
        it = iter(range(10**9))
        plan = [(s, lab if lab == "normal" else fams[next(it) % len(fams)]) for s, lab in plan]
    width = max(3, len(str(len(plan))))
    return [(f"case{i:0{width}d}-{lab}", s, lab) for i, (s, lab) in enumerate(plan)]


def _one(job: tuple[str, int, str, str, int, str]) -> dict[str, object]:
    case_id, seed, label, out, matrix, subtle_opt = job
    from model.synth import make_case
    from triage_agent.synth_dicom import synthetic_patient, uid_for, write_case_dicom

    subtle = {"auto": None, "yes": True, "no": False}[subtle_opt]
    t = time.perf_counter()
    case = make_case(seed, label, subtle=subtle, matrix=matrix)
    name, pid = synthetic_patient(seed)
    paths = write_case_dicom(case, Path(out) / case_id, patient_name=name, patient_id=pid)
    key = (case.seed, case.label, bool(case.subtle))
    return {
        "case_id": case_id,
        "series_instance_uid": uid_for("series", *key, 2),
        "study_instance_uid": uid_for("study", *key),
        "label": case.label,
        "subtle": int(case.subtle),
        "seed": seed,
        "n_slices": len(paths),
        "_seconds": time.perf_counter() - t,
    }


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    try:
        plan = _plan(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not plan:
        print("error: nothing to do (--normals and --abnormals are both 0)", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(cid, s, lab, str(out), args.matrix, args.subtle) for cid, s, lab in plan]
    t0 = time.perf_counter()
    rows: list[dict[str, object]] = []
    bar = tqdm(total=len(jobs), desc="synth", unit="case")
    try:
        if args.jobs > 1:
            with get_context("spawn").Pool(args.jobs) as pool:
                for row in pool.imap(_one, jobs):
                    rows.append(row)
                    bar.update()
        else:
            for j in jobs:
                rows.append(_one(j))
                bar.update()
    finally:
        bar.close()
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LABEL_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    wall = time.perf_counter() - t0
    counts = Counter(str(r["label"]) for r in rows)
    subtle = sum(int(r["subtle"]) for r in rows)  # type: ignore[call-overload]
    slices = sum(int(r["n_slices"]) for r in rows)  # type: ignore[call-overload]
    print(
        f"wrote {len(rows)} series ({slices} slices) to {out} in {wall:.1f} s "
        f"({wall / len(rows):.2f} s/case with {args.jobs} job(s)); {subtle} subtle"
    )
    for lab, n in sorted(counts.items()):
        print(f"  {lab:32s} {n}")
    print(f"labels: {out / 'labels.csv'}")
    return 0
