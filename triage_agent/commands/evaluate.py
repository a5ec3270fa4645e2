"""``triage-agent evaluate``: every method on one labelled normal + abnormal set.

Data: a folder written by ``triage-agent synth`` (labels.csv + one folder of DICOM files and a
lesion mask per case), or ``--synthetic-normals N --synthetic-abnormals M --seed S`` generated in
memory (use seeds disjoint from training). Models: ``--model CKPT`` (repeatable) and/or
``--models-dir DIR`` (every *.pt in it). Writes table.md, results.json, roc.png, pr.png and
contact_sheet.png to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="evaluate detectors and baselines on a labelled set",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", type=Path, help="labelled folder (labels.csv + series)")
    p.add_argument("--synthetic-normals", type=int, default=None, metavar="N",
                   help="generate N synthetic normal series in memory instead of DATA")
    p.add_argument("--synthetic-abnormals", type=int, default=None, metavar="M",
                   help="generate M synthetic abnormal series in memory instead of DATA")
    p.add_argument("--seed", type=int, default=2000,
                   help="synthetic test-set seed (default 2000; keep it apart from training's)")
    p.add_argument("--matrix", type=int, default=512,
                   help="synthetic in-plane matrix (default 512)")
    p.add_argument("--model", type=Path, action="append", default=[], metavar="CKPT",
                   help="checkpoint to evaluate (repeatable; default: the bundled weights)")
    p.add_argument("--models-dir", type=Path, default=None, metavar="DIR",
                   help="evaluate every *.pt in DIR")
    p.add_argument("--out", type=Path, default=Path("evaluation"), metavar="DIR",
                   help="folder for the table, results and figures (default ./evaluation)")
    p.add_argument("--lambda", dest="lambda_", type=float, default=0.5,
                   help="weight of the reconstruction term in a two-term score, 0-1 (default 0.5)")
    p.add_argument("--top-k", type=int, default=3, metavar="K",
                   help="series score also reported as the mean of the top K slices (default 3)")
    p.add_argument("--batch-size", type=int, default=32, help="slices per scoring batch")
    p.add_argument("--primary", default=None, metavar="METHOD",
                   help="method shown in the contact sheet (default: multitask if given, else the "
                        "first model)")
    p.add_argument("--cache", type=Path, default=Path(".cache/preprocessed"), metavar="DIR",
                   help="folder for preprocessed .npz arrays (default .cache/preprocessed)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run the models (default auto: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from triage_model.baselines import load_any_detector
    from triage_model.checkpoint import CheckpointError
    from triage_model.evaluate import EvalCase, evaluate

    from triage_agent.datasets import folder_cases, synthetic_cases

    if args.threads:
        torch.set_num_threads(args.threads)
    paths = list(args.model)
    if args.models_dir is not None:
        paths += sorted(p for p in args.models_dir.glob("*.pt") if not p.name.endswith(".state.pt"))
    try:
        dets = ([load_any_detector(p, device=args.device) for p in paths] if paths
                else [load_any_detector()])
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = dets[0].input_size
    if args.data is not None:
        cases = folder_cases(args.data, size=size, cache_dir=args.cache,
                             progress=not args.no_progress)
        meta: dict[str, Any] = {"source": str(args.data.resolve())}
    elif args.synthetic_normals is not None or args.synthetic_abnormals is not None:
        n, m = args.synthetic_normals or 0, args.synthetic_abnormals or 0
        cases = synthetic_cases(n, m, args.seed, size=size, matrix=args.matrix,
                                cache_dir=args.cache, progress=not args.no_progress)
        meta = {"source": "synthetic", "normals": n, "abnormals": m, "seed": args.seed,
                "matrix": args.matrix}
    else:
        print("error: give a labelled folder or --synthetic-normals/--synthetic-abnormals",
              file=sys.stderr)
        return 2
    ev = [EvalCase(c.case_id, c.label, c.x, c.brain, c.lesion, c.subtle, c.hu) for c in cases
          if len(c.x)]
    meta["models"] = [{"path": str(p), "method": d.method, "sha256": d.weights_sha256}
                      for p, d in zip(paths, dets, strict=False)]
    doc = evaluate(dets, ev, args.out, lambda_=args.lambda_, top_k=args.top_k,
                   batch_size=args.batch_size, primary=args.primary, meta=meta,
                   progress=not args.no_progress)
    print(doc["table_markdown"])
    print(f"wrote {args.out}/table.md, results.json, roc.png, pr.png, contact_sheet.png")
    return 0
