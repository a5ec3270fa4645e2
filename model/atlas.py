"""Fit a detector's residual atlas on normal series, then recalibrate it.

The atlas holds, for every pixel and every band of relative slice height, the mean and spread of
the smoothed residual that the detector leaves on *normal* slices (``ScoringConfig.atlas_bins``,
``triage_model.scoring.ResidualAtlas``). With it, the slice statistic is taken of the pixel-wise z-map,
so that places where normal anatomy always leaves residual (skull base, the inner table of the
skull) count for less than the same residual in the middle of the brain. The heat maps do not
change.

A site adapts the shipped model to its own images with ``triage-agent onboard --normal DIR --out
FILE``, which reads the DICOM series, splits them and calls the functions here; this command is
for slice archives (``triage-agent train --export-slices``), e.g. on a machine without the DICOM
stack.

The atlas and the calibration must come from different normal series: a threshold measured on
the series that the atlas was fitted to would sit too low for new ones. So ``--atlas-slices``
(the normals to fit the atlas on) and ``--slices`` (the normals to calibrate on: normalisation
and operating thresholds) are separate slice archives (``triage-agent train --export-slices``),
or one archive split by series with ``--atlas-fraction``::

    python -m triage_model.atlas OUT.pt --model IN.pt --atlas-slices normals_a.npz --slices normals_b.npz
    python -m triage_model.atlas OUT.pt --slices normals.npz --atlas-fraction 0.7
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from triage_model.checkpoint import (
    CheckpointError,
    Detector,
    default_weights_path,
    read_checkpoint,
    save_checkpoint,
)
from triage_model.scoring import (
    ATLAS_HEIGHTS,
    AtlasFitter,
    ResidualAtlas,
    ScoringConfig,
    atlas_heights,
    masked_stat,
)
from triage_model.train import SliceSet, calibrate

log = logging.getLogger(__name__)


def plain_detector(ckpt: dict[str, Any], device: str | torch.device = "cpu") -> Detector:
    """``ckpt``'s detector without its atlas: ``raw_scores`` gives the plain residual maps (the
    heat maps) that an atlas is fitted to and applied to (``stat_with_atlas``)."""
    sc = ScoringConfig.from_dict(ckpt.get("scoring"))
    det = Detector({**ckpt, "scoring": replace(sc, atlas_bins=0).to_dict()}, device=device)
    if det.net is None or not det.uses["rec"]:
        raise CheckpointError(f"method {det.method!r} has no reconstruction to fit an atlas to")
    return det


def stat_with_atlas(r_plain: np.ndarray, heat: np.ndarray, brain: np.ndarray,
                    heights: np.ndarray, atlas: ResidualAtlas | None, scoring: ScoringConfig,
                    chunk: int = 256) -> np.ndarray:
    """The raw reconstruction statistic (``Detector.raw_scores``' s_r) that a detector with
    ``atlas`` gives, from the plain detector's ``r_plain`` and heat maps: the top-q statistic of
    the atlas z-map (``Detector.rec_stat``). An asymmetry column (``symmetry``) is kept as it
    is: it does not depend on the atlas. No atlas: ``r_plain``."""
    if atlas is None:
        return r_plain
    out = np.array(r_plain, dtype=np.float32, copy=True)
    for s in range(0, len(out), chunk):
        sl = slice(s, s + chunk)
        h = torch.from_numpy(np.asarray(heat[sl], np.float32))
        st = masked_stat(atlas.zmap(h, heights[sl]), torch.from_numpy(np.asarray(brain[sl])),
                         scoring).numpy()
        if out.ndim == 2:
            out[sl, 0] = st
        else:
            out[sl] = st
    return out


def fit_atlas(ckpt: dict[str, Any], normals: SliceSet, *, bins: int = 16, sigma: float = 1.5,
              eps: float = 0.002, height: str = "slice", batch_size: int = 32,
              device: str = "cpu", chunk: int = 512, progress: bool = False) -> ResidualAtlas:
    """The residual atlas of ``ckpt``'s network on ``normals`` (each series in slice order),
    with height bands of kind ``height`` (``ResidualAtlas.height``)."""
    det = plain_detector(ckpt, device)
    fitter = AtlasFitter(bins, det.input_size, height)
    heights = atlas_heights(height, normals.brain, normals.series)
    for s in range(0, len(normals), chunk):
        sl = slice(s, s + chunk)
        _, _, heat = det.raw_scores(normals.x[sl], normals.brain[sl], batch_size)
        fitter.add(heat, normals.brain[sl], heights[sl], normals.series[sl])
        if progress:
            print(f"\ratlas: {min(s + chunk, len(normals))}/{len(normals)} slices", end="",
                  file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return fitter.finish(sigma, eps)


def with_atlas(ckpt: dict[str, Any], atlas: ResidualAtlas, *, source: str = "") -> dict[str, Any]:
    """A copy of ``ckpt`` that scores with ``atlas`` (calibrate it afterwards)."""
    out = dict(ckpt)
    sc = ScoringConfig.from_dict(ckpt.get("scoring"))
    out["scoring"] = replace(sc, atlas_bins=atlas.bins).to_dict()
    out["atlas"] = atlas.to_dict()
    training = dict(out.get("training") or {})
    training["atlas"] = {"bins": atlas.bins, "height": atlas.height, "sigma": atlas.sigma,
                         "eps": atlas.eps,
                         "normal_series": atlas.n_series, "normal_slices": atlas.n_slices,
                         "source": source}
    out["training"] = training
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m triage_model.atlas", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the new checkpoint")
    ap.add_argument("--model", type=Path, default=None,
                    help="checkpoint to start from (default: the bundled weights)")
    ap.add_argument("--slices", type=Path, required=True,
                    help="slice archive of normal series to calibrate on")
    ap.add_argument("--atlas-slices", type=Path, default=None,
                    help="slice archive of other normal series to fit the atlas on")
    ap.add_argument("--atlas-fraction", type=float, default=None,
                    help="without --atlas-slices: fit the atlas on this share of --slices' "
                         "series (seeded split), calibrate on the rest")
    ap.add_argument("--bins", type=int, default=16, help="relative-height bins (default 16)")
    ap.add_argument("--height", choices=ATLAS_HEIGHTS, default=None,
                    help="what the bins are bands of: the slice's position in its series or the "
                         "share of the series' brain volume below it (default: as the model's "
                         "atlas; slice without one; triage-agent onboard fits brain_volume)")
    ap.add_argument("--sigma", type=float, default=1.5, help="atlas smoothing, pixels")
    ap.add_argument("--eps", type=float, default=0.002, help="floor added to the atlas spread")
    ap.add_argument("--seed", type=int, default=0, help="seed of the --atlas-fraction split")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if (a.atlas_slices is None) == (a.atlas_fraction is None):
        print("error: give either --atlas-slices or --atlas-fraction", file=sys.stderr)
        return 2
    try:
        ckpt, _ = read_checkpoint(a.model or default_weights_path())
        cal, _ = SliceSet.load(a.slices)
        if a.atlas_slices is not None:
            normals, _ = SliceSet.load(a.atlas_slices)
            source = str(a.atlas_slices)
        else:
            if not 0.0 < a.atlas_fraction < 1.0:
                raise ValueError(f"--atlas-fraction must be in (0, 1), got {a.atlas_fraction}")
            cal, normals = cal.split(a.atlas_fraction, seed=a.seed)
            source = f"{a.slices} ({a.atlas_fraction:.0%} of its series, seed {a.seed})"
        if normals.n_series < 20 or cal.n_series < 20:
            print(f"warning: {normals.n_series} atlas and {cal.n_series} calibration series; "
                  "use 100+ and 50+ normal series for a stable atlas and threshold",
                  file=sys.stderr)
        height = a.height or str((ckpt.get("atlas") or {}).get("height", "slice"))
        atlas = fit_atlas(ckpt, normals, bins=a.bins, sigma=a.sigma, eps=a.eps, height=height,
                          device=a.device, progress=True)
        ck = calibrate(with_atlas(ckpt, atlas, source=source), cal,
                       device=a.device)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    digest = save_checkpoint(ck, a.out)
    print(f"wrote {a.out}: residual atlas of {atlas.bins} height bins from {atlas.n_series} "
          f"normal series ({atlas.n_slices} slices); calibrated on {cal.n_series} other series, "
          f"threshold(max) {ck['thresholds']['max']:.3f}, sha256 {digest[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
