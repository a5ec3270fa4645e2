"""``triage-agent train``: train a detector on normal series and write a calibrated checkpoint.

Data: a folder of normal DICOM series (searched recursively; with a labels.csv only the rows
labelled normal are used), or ``--synthetic N --seed S`` generated in memory. Preprocessed arrays
are cached as .npz under ``--cache``. ``--method`` picks any method of the harness; ``--resume``
continues from the last saved training state next to ``--out``. Runs under ``torchrun`` too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from triage_model.options import ALL_METHODS, add_override_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the detector (or a baseline) on normal series",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", type=Path, help="folder of normal DICOM series")
    p.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="train on N synthetic normal series generated in memory")
    p.add_argument("--seed", type=int, default=1000, help="synthetic data seed (and training seed)")
    p.add_argument("--method", default="dae", choices=ALL_METHODS,
                   help="dae = the bundled default's method (see model/weights/MODEL_CARD.md); "
                        "multitask = the seed paper's model; the rest are baselines")
    p.add_argument("--out", type=Path, default=None, help="checkpoint path (default: ./<method>.pt)")
    p.add_argument("--steps", type=int, default=3000, help="total optimisation steps")
    p.add_argument("--pretrain-fraction", type=float, default=0.2,
                   help="share of the steps spent on context-restoration pretraining")
    p.add_argument("--batch-size", type=int, default=32, help="slices per optimisation step")
    add_override_options(p)  # --lr, --lr-decay-*, --spot-weight, --rec-q, --norm-bins, ...
    p.add_argument("--eps", type=float, default=None, help="multitask reconstruction weight")
    p.add_argument("--beta", type=float, default=None, help="KL weight")
    p.add_argument("--input-size", type=int, default=128, metavar="PIXELS",
                   help="network input: slices resampled to PIXELS x PIXELS (default 128)")
    p.add_argument("--matrix", type=int, default=512, help="synthetic in-plane matrix")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of series held out for normalisation and threshold calibration")
    p.add_argument("--target-specificity", type=float, default=0.95,
                   help="the threshold is set for this specificity on the held-out normals "
                        "(default 0.95)")
    p.add_argument("--cache", type=Path, default=Path(".cache/preprocessed"),
                   help="folder for preprocessed .npz arrays")
    p.add_argument("--resume", action="store_true",
                   help="continue from the training state saved next to --out")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to train (default auto: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("--export-slices", type=Path, default=None, metavar="FILE.npz",
                   help="write the preprocessed training slices to FILE.npz and stop, to train "
                        "elsewhere with `python -m triage_model.train OUT --slices FILE.npz` (a GPU "
                        "machine needs PyTorch and NumPy only)")
    p.set_defaults(func=run)


def load_training_cases(args: argparse.Namespace) -> tuple[list, dict]:
    from triage_agent.datasets import folder_cases, synthetic_cases

    if (args.synthetic is None) == (args.folder is None):
        raise SystemExit("error: give either a FOLDER of normal series or --synthetic N")
    if args.synthetic is not None:
        cases = synthetic_cases(args.synthetic, 0, args.seed, size=args.input_size,
                                matrix=args.matrix, cache_dir=args.cache,
                                progress=not args.no_progress)
        summary = {"source": "synthetic", "normals": args.synthetic, "seed": args.seed,
                   "matrix": args.matrix, "case_ids": [c.case_id for c in cases]}
    else:
        cases = folder_cases(args.folder, size=args.input_size, cache_dir=args.cache,
                             labelled=False, progress=not args.no_progress)
        cases = [c for c in cases if not c.abnormal]
        summary = {"source": "dicom", "folder": str(args.folder.resolve()), "series": len(cases)}
    return cases, summary


def cases_to_slices(cases: list):
    import numpy as np
    from triage_model.train import SliceSet

    xs = [c.x for c in cases if len(c.x)]
    if not xs:
        raise SystemExit("error: no usable slices in the training data")
    use = [c for c in cases if len(c.x)]
    hu = np.concatenate([c.hu for c in use]).astype(np.float32) \
        if all(c.hu is not None for c in use) else None
    return SliceSet(
        np.concatenate(xs).astype(np.float32),
        np.concatenate([c.brain for c in use]),
        np.concatenate([np.full(len(c.x), i) for i, c in enumerate(cases) if len(c.x)]),
        hu,
    )


def run(args: argparse.Namespace) -> int:
    from triage_model.network import NetConfig
    from triage_model.options import overrides_from_args
    from triage_model.train import default_config, train

    cases, summary = load_training_cases(args)
    data = cases_to_slices(cases)
    if args.export_slices is not None:
        data.save(args.export_slices, summary)
        size = args.export_slices.stat().st_size / 1e6
        print(f"wrote {args.export_slices}: {len(data)} slices of {data.n_series} series "
              f"({size:.1f} MB); train with: python -m triage_model.train OUT --slices "
              f"{args.export_slices} --method {args.method} --steps {args.steps} "
              f"--batch-size {args.batch_size} --seed {args.seed}. To adapt the shipped model "
              "to a site's normal series, no archive is needed: triage-agent onboard --normal "
              "DIR --out FILE", flush=True)
        return 0
    tr, va = data.split(args.val_fraction, seed=args.seed)
    summary.update(train_slices=len(tr), val_slices=len(va))
    over = overrides_from_args(args, ("eps", "beta"))
    cfg = default_config(args.method, total_steps=args.steps,
                         pretrain_fraction=args.pretrain_fraction, batch_size=args.batch_size,
                         seed=args.seed, num_threads=args.threads,
                         target_specificity=args.target_specificity,
                         net=NetConfig(input_size=args.input_size), **over)
    out = args.out or Path(f"{args.method}.pt")
    print(f"training {args.method} on {len(tr)} slices ({tr.n_series} series), "
          f"validating on {len(va)} slices ({va.n_series} series) -> {out}", file=sys.stderr)
    ck = train(cfg, tr, va, out, resume=args.resume, progress=not args.no_progress,
               device=args.device, data_summary=summary)
    if ck is not None:
        t = ck["training"]
        print(f"wrote {out}: threshold(max) {ck['thresholds'].get('max', float('nan')):.3f}, "
              f"{t.get('wall_s', 0):.0f} s, {t.get('slices_per_s', 0):.1f} slices/s", flush=True)
    return 0
