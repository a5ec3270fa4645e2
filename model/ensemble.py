"""Combine denoising U-Nets trained apart into one detector checkpoint (mean reconstruction).

    python -m triage_model.ensemble OUT.pt A.pt B.pt [C.pt ...] --slices train.npz

Every member must be a ``dae`` checkpoint trained on the same slice archive with the same
held-out validation series (the same ``--split-seed``; ``python -m triage_model.train --split-seed K
--seed S`` trains such replicas). The ensemble is then normalised and thresholded afresh on those
validation series, which none of its members has seen. The result loads like any checkpoint
(``serve``, ``score``, ``evaluate --model``); it costs one forward pass per member per slice.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from triage_model.checkpoint import (
    DISPLAY_NAMES,
    CheckpointError,
    make_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from triage_model.network import NetConfig, build_network
from triage_model.scoring import ScoringConfig
from triage_model.train import SliceSet, calibrate


class EnsembleError(ValueError):
    """The checkpoints cannot be combined (wrong method, size or validation split)."""


def split_of(ck: dict[str, Any]) -> tuple[int, int]:
    """(split seed, number of validation series) of a ``python -m triage_model.train --slices`` run."""
    t = ck.get("training", {})
    cfg, data = t.get("train_config", {}), t.get("data", {})
    seed = data.get("split_seed", cfg.get("seed"))  # before --split-seed, --seed split the data
    return int(seed), int(t.get("val_series") or 0)


def combine(members: list[tuple[dict[str, Any], str]], *, name: str | None = None
            ) -> dict[str, Any]:
    """One uncalibrated ``dae`` checkpoint whose network averages the members' reconstructions.

    ``members`` = (checkpoint, its SHA-256) pairs, as ``read_checkpoint`` returns them."""
    if len(members) < 2:
        raise EnsembleError("an ensemble needs at least two member checkpoints")
    cfgs, state, sizes = [], {}, set()
    for i, (ck, _) in enumerate(members):
        nc = ck.get("net_config") or {}
        if ck.get("method") != "dae" or nc.get("arch") != "unet":
            raise EnsembleError(f"member {i + 1} is a {ck.get('method')!r} checkpoint; only "
                                "denoising U-Nets (method 'dae') can be combined")
        cfgs.append(NetConfig.from_dict(nc).to_dict())
        sizes.add(int(ck["input_size"]))
        state.update({f"members.{i}.{k}": v for k, v in ck["state_dict"].items()})
    if len(sizes) > 1:
        raise EnsembleError(f"members take different slice sizes {sorted(sizes)}")
    splits = {split_of(ck) for ck, _ in members}
    if len(splits) > 1:
        raise EnsembleError(
            f"members were validated on different series (split seed, series: {sorted(splits)}): a "
            "member trained on another's validation series would bias the calibration; train "
            "replicas with the same --split-seed")
    ids = [ck["training"].get("data", {}).get("val_series_ids") for ck, _ in members]
    if len({tuple(v) for v in ids if v is not None}) > 1:
        raise EnsembleError("members hold out different validation series (val_series_ids)")
    cfg = NetConfig(input_size=sizes.pop(), arch="ensemble", members=tuple(cfgs))
    net = build_network(cfg)
    net.load_state_dict(state)
    first = members[0][0]
    training = {
        "method": "dae", "ensemble": True,
        "members": [{"sha256": digest, "name": ck.get("name"), "net_config": ck["net_config"],
                     "training": ck.get("training", {})} for ck, digest in members],
        "data": first.get("training", {}).get("data", {}),
    }
    ck = make_checkpoint("dae", net=net, scoring=ScoringConfig.from_dict(first.get("scoring")),
                         training=training, name=name or f"ssl-ood-dae-ensemble{len(members)}")
    ck["display_name"] = f"{DISPLAY_NAMES['dae']}, mean of {len(members)} U-Nets"
    return ck


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m triage_model.ensemble", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("members", type=Path, nargs="+", help="dae checkpoints (two or more)")
    ap.add_argument("--slices", type=Path, required=True,
                    help="the members' training archive: its validation series calibrate")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--name", default=None)
    ap.add_argument("--symmetry", default=None, action=argparse.BooleanOptionalAction,
                    help="score with the asymmetric residual too (default: as the first member)")
    ap.add_argument("--slice-context", type=float, default=None, metavar="W",
                    help="average each slice's statistic with its neighbours' (weight W each; "
                         "default: as the first member)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    try:
        members = [read_checkpoint(p) for p in a.members]
        ck = combine(members, name=a.name)
        if a.symmetry is not None:
            ck["scoring"]["symmetry"] = bool(a.symmetry)
        if a.slice_context is not None:
            if a.slice_context < 0:
                raise EnsembleError(f"--slice-context must be >= 0, got {a.slice_context}")
            ck["scoring"]["slice_context"] = float(a.slice_context)
    except (CheckpointError, EnsembleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data, _ = SliceSet.load(a.slices)
    seed, n_val = split_of(members[0][0])
    _, va = data.split(n_val / data.n_series, seed=seed)
    ids = members[0][0]["training"].get("data", {}).get("val_series_ids")
    if va.n_series != n_val or (ids is not None and va.series_ids != list(ids)):
        print(f"error: {a.slices} does not split into the members' validation series; give the "
              "archive they were trained on", file=sys.stderr)
        return 2
    ck = calibrate(ck, va, device=a.device)
    ck["training"]["val_series"], ck["training"]["val_slices"] = va.n_series, len(va)
    digest = save_checkpoint(ck, a.out)
    print(f"wrote {a.out}: ensemble of {len(members)} U-Nets, calibrated on {va.n_series} "
          f"validation series ({len(va)} slices), threshold(max) {ck['thresholds']['max']:.3f}, "
          f"sha256 {digest[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
