"""The research baselines that training and evaluation compare the shipped detector with, and
how they score.

=================  ==============================================================================
``hu_threshold``   hyperdense intensity threshold fitted on normal brain pixels (no learning)
``vae``            VAE (Zimmerer et al. 2019): slice score = reconstruction error in the brain
``cevae``          context-encoding VAE (Zimmerer et al. 2019): VAE + restoration of noised boxes
``vae_pretrained`` VAE pretrained by context restoration (patch swap), then plain VAE training
``geometry_only``  ablation: context-restoration pretraining, then the geometric head alone
=================  ==============================================================================

Next to the two method families the node runs (``triage_model.checkpoint.SHIPPED_METHODS``:
``dae``, the denoising U-Net, and ``multitask``, the seed paper's VAE + geometric head), every
learned baseline shares the network (``triage_model.network.MultitaskVAE``), the data, optimiser,
step budget (``triage_model.train``) and the scoring code; they differ only in their loss and in
which terms their score uses. ``load_any_detector`` loads a checkpoint of any of these methods
for ``triage-agent evaluate``; the node itself loads only the shipped ones
(``triage_model.checkpoint.load_detector``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from triage_model.checkpoint import (
    DISPLAY_NAMES as SHIPPED_DISPLAY_NAMES,
)
from triage_model.checkpoint import (
    SHIPPED_METHODS,
    Detector,
    default_weights_path,
    read_checkpoint,
)
from triage_model.options import ALL_METHODS
from triage_model.scoring import ResidualAtlas, masked_stat, smooth

log = logging.getLogger(__name__)

#: The research baselines' score terms ("geo": geometric head, "rec": reconstruction or, for
#: the HU threshold, its hyperdense-pixel map).
RESEARCH_METHODS: dict[str, dict[str, bool]] = {
    "geometry_only": {"geo": True, "rec": False},
    "vae": {"geo": False, "rec": True},
    "cevae": {"geo": False, "rec": True},
    "vae_pretrained": {"geo": False, "rec": True},
    "hu_threshold": {"geo": False, "rec": True},
}
#: Every method training writes, with its score terms.
METHODS: dict[str, dict[str, bool]] = {**SHIPPED_METHODS, **RESEARCH_METHODS}
DISPLAY_NAMES: dict[str, str] = {
    **SHIPPED_DISPLAY_NAMES,
    "geometry_only": "Geometric head only (ablation)",
    "vae": "VAE (Zimmerer 2019)",
    "cevae": "ceVAE (Zimmerer 2019)",
    "vae_pretrained": "VAE + context-restoration pretraining",
    "hu_threshold": "HU threshold",
}
assert set(ALL_METHODS) == set(METHODS) == set(DISPLAY_NAMES)


class BaselineDetector(Detector):
    """The learned baselines: the same network scoring as ``Detector``, with the terms of
    ``RESEARCH_METHODS`` (the VAEs: reconstruction only; ``geometry_only``: geometric head)."""

    TERMS: ClassVar[dict[str, dict[str, bool]]] = {
        m: t for m, t in METHODS.items() if m != "hu_threshold"
    }


def near_bone(hu: torch.Tensor, bone_hu: float, margin_px: int) -> torch.Tensor:
    """(B,S,S) bool: pixels within ``margin_px`` of a pixel denser than ``bone_hu``."""
    if margin_px <= 0:
        return torch.zeros_like(hu, dtype=torch.bool)
    k = 2 * margin_px + 1
    bone = (hu > bone_hu).float().unsqueeze(1)
    return torch.nn.functional.max_pool2d(bone, k, stride=1, padding=margin_px)[:, 0] > 0


class HUThresholdDetector(Detector):
    """The HU-threshold baseline: no network; s_r is the statistic of the smoothed map of
    hyperdense brain pixels (the band fitted by ``triage_model.train.fit_hu_threshold``)."""

    TERMS: ClassVar[dict[str, dict[str, bool]]] = {"hu_threshold": METHODS["hu_threshold"]}
    READS_HU: ClassVar[bool] = True

    def __init__(self, ckpt: dict[str, Any], device: str | torch.device = "auto",
                 weights_sha256: str = "") -> None:
        super().__init__(ckpt, device, weights_sha256)
        self.hu: dict[str, float] = dict(ckpt.get("hu") or {})

    def _residual_options(self, ckpt: dict[str, Any]) -> tuple[bool, ResidualAtlas | None]:
        return False, None  # no residual map to mirror or to compare with an atlas

    def _network(self, ckpt: dict[str, Any]) -> torch.nn.Module | None:
        return None

    def _batch(self, xb: torch.Tensor, mb: torch.Tensor, hb: torch.Tensor | None = None,
               heights: np.ndarray | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre = float(self.hu.get("presmooth", 0.0))  # denoise before thresholding
        if hb is not None and "hu_lo" in self.hu:
            # hyperdense band in HU: above normal parenchyma, below calcification, away
            # from bone (partial volume at the inner table is not blood)
            lo, up = float(self.hu["hu_lo"]), float(self.hu["hu_hi"])
            v = smooth(hb, pre)
            m = ((v >= lo) & (v <= up) & mb & ~near_bone(hb, up, int(self.hu.get(
                "bone_margin_px", 0)))).float()
        else:  # window units: saturated pixels (calcification, bone) are not counted
            hi, top = float(self.hu["hi"]), float(self.hu.get("top", 2.0))
            v = smooth(xb, pre)
            m = ((v > hi) & (v < top) & mb).float()
        heat = smooth(m, self.scoring.smooth_sigma) * mb
        return xb.new_zeros(xb.shape[0]), masked_stat(heat, mb, self.scoring), heat


def detector_for(ckpt: dict[str, Any], device: str | torch.device = "auto",
                 weights_sha256: str = "") -> Detector:
    """The detector of a checkpoint of any method: the node's ``Detector`` for the shipped
    methods, so that evaluation scores them exactly as the node does; else a baseline's."""
    method = ckpt.get("method")
    cls: type[Detector] = Detector
    if method == "hu_threshold":
        cls = HUThresholdDetector
    elif method in RESEARCH_METHODS:
        cls = BaselineDetector
    return cls(ckpt, device=device, weights_sha256=weights_sha256)


def load_any_detector(path: Path | str | None = None, device: str = "auto") -> Detector:
    """``triage_model.checkpoint.load_detector`` for checkpoints of any method (evaluation)."""
    p = Path(path) if path is not None else default_weights_path()
    ck, digest = read_checkpoint(p)
    det = detector_for(ck, device=device, weights_sha256=digest)
    log.info("loaded %r from %s", det, p)
    return det
