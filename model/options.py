"""Method names and the override options of both training commands (``triage-agent train`` and
``python -m triage_model.train``). No torch here: argument parsing and ``--help`` stay quick."""

from __future__ import annotations

import argparse
from typing import Any

ALL_METHODS: tuple[str, ...] = (
    "hu_threshold", "vae", "cevae", "vae_pretrained", "geometry_only", "multitask", "dae",
)

TRAIN_OVERRIDES = ("lr", "lr_decay_steps", "lr_decay_fraction", "spot_weight")
SCORING_OVERRIDES = ("rec_q", "norm_bins", "flip_tta", "symmetry", "slice_context")


def _non_negative(text: str) -> float:
    v = float(text)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def add_override_options(p: argparse.ArgumentParser) -> None:
    """The options both training commands take to override ``train.default_config``; read
    them back with ``overrides_from_args``."""
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default 5e-4)")
    p.add_argument("--lr-decay-steps", type=int, default=None,
                   help="the last N steps lower the learning rate linearly to 0 (default: none)")
    p.add_argument("--lr-decay-fraction", type=float, default=None,
                   help="the last fraction of the run (of the steps, or of --time-budget if that "
                        "ends it first) lowers the learning rate linearly to 0")
    p.add_argument("--spot-weight", type=float, default=None,
                   help="dae: paint 2-6 small spots into every training slice and weight the "
                        "error inside them 1 + this, so that small lesions get repaired too "
                        "(0 = off, the default; the bundled members were fine-tuned with 20)")
    p.add_argument("--rec-q", type=float, default=None,
                   help="s_r = mean of this top fraction of the residual map "
                        "(default 0.001 for dae, else 0.01)")
    p.add_argument("--norm-bins", type=int, default=None,
                   help="normalise s_g/s_r per this many brain-area bins (default 0 = global)")
    p.add_argument("--flip-tta", default=None, action=argparse.BooleanOptionalAction,
                   help="score with the mirrored slice's reconstruction averaged in "
                        "(default: on for dae, off otherwise)")
    p.add_argument("--symmetry", default=None, action=argparse.BooleanOptionalAction,
                   help="s_r also from the asymmetric residual: the residual that the mirrored "
                        "place across the fitted midline does not show (model/symmetry.py); "
                        "costs a midline fit per slice")
    p.add_argument("--slice-context", type=_non_negative, default=None, metavar="W",
                   help="average each slice's statistic with its neighbours' in the series, "
                        "weight W each (default 0 = off, as in the bundled model)")


def overrides_from_args(args: argparse.Namespace, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """``default_config`` keyword overrides from the options given (left out: None), the
    ``TRAIN_OVERRIDES`` and ``extra`` fields, plus ``scoring`` = the scoring fields given."""
    over = {k: getattr(args, k) for k in (*TRAIN_OVERRIDES, *extra)
            if getattr(args, k) is not None}
    over["scoring"] = {k: getattr(args, k) for k in SCORING_OVERRIDES
                       if getattr(args, k) is not None}
    return over
