"""The methods compared in the harness, each trainable and scorable through the same interface.

=================  ==============================================================================
``hu_threshold``   hyperdense intensity threshold fitted on normal brain pixels (no learning)
``vae``            VAE (Zimmerer et al. 2019): slice score = reconstruction error in the brain
``cevae``          context-encoding VAE (Zimmerer et al. 2019): VAE + restoration of noised boxes
``vae_pretrained`` VAE pretrained by context restoration (patch swap), then plain VAE training
``geometry_only``  ablation: context-restoration pretraining, then the geometric head alone
``multitask``      the seed paper: pretraining, then L_geo + eps * (L_rec + beta * KL)
``dae``            denoising U-Net (Kascenas et al. 2022): restores slices corrupted by coarse
                   noise; slice score = residual of the clean slice, as for the VAE
=================  ==============================================================================

All learned methods but ``dae`` share the network (``triage_model.network.MultitaskVAE``); all share the data, optimiser, step
budget and scoring code (``triage_model.checkpoint.Detector``); they differ only in their loss and in
which terms their score uses. The step budget of a method with pretraining includes it, so every
learned method sees the same number of optimisation steps.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from triage_model.checkpoint import DISPLAY_NAMES, METHODS
from triage_model.network import NetConfig
from triage_model.options import (  # noqa: F401  (the training options, re-exported)
    ALL_METHODS,
    add_override_options,
    overrides_from_args,
)
from triage_model.scoring import ScoringConfig
from triage_model.train import PRETRAINED_METHODS, SliceSet, TrainConfig, train

LEARNED_METHODS = tuple(m for m in ALL_METHODS if m != "hu_threshold")
assert set(ALL_METHODS) == set(METHODS)


# What the bundled default model (model/weights/MODEL_CARD.md) was trained and scored with, chosen
# on the synthetic development sets: a site's ``triage-agent train --method dae`` gets the same
# (the members' spot fine-tune, ``spot_weight``, is an option). rec_q 0.001 matches the bundled
# file; for a U-Net trained without spots 0.001 and 0.003 score alike (docs/experiments.md).
DAE_DEFAULTS: dict[str, Any] = {"noise_std": 0.3, "noise_res": 16}
DAE_SCORING = ScoringConfig(rec_q=0.001, norm_bins=0, flip_tta=True)


def default_scoring(method: str) -> ScoringConfig:
    return DAE_SCORING if method == "dae" else ScoringConfig()


def default_config(method: str, *, total_steps: int = 3000, pretrain_fraction: float = 0.2,
                   **overrides: Any) -> TrainConfig:
    """Training configuration of ``method`` with a shared total step budget.

    ``scoring`` may be a ``ScoringConfig`` (used as is) or a dict of fields that override the
    method's default scoring (``default_scoring``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")
    pre = int(round(total_steps * pretrain_fraction)) if method in PRETRAINED_METHODS else 0
    cfg = TrainConfig(method=method, pretrain_steps=pre, steps=total_steps - pre,
                      scoring=default_scoring(method))
    if method == "geometry_only":
        cfg = replace(cfg, eps=0.0)
    if method == "dae":
        cfg = replace(cfg, **DAE_DEFAULTS)
    sc = overrides.pop("scoring", None)
    if isinstance(sc, ScoringConfig):
        cfg = replace(cfg, scoring=sc)
    elif sc:
        cfg = replace(cfg, scoring=replace(cfg.scoring, **sc))
    net = overrides.pop("net", None)
    if net is not None:
        cfg = replace(cfg, net=net if isinstance(net, NetConfig) else NetConfig.from_dict(net))
    return replace(cfg, **overrides)


def display_name(method: str) -> str:
    return DISPLAY_NAMES[method]


def train_method(method: str, train_set: SliceSet, val_set: SliceSet, out: Path | str,
                 **kw: Any) -> dict[str, Any] | None:
    cfg_kw = {k: kw.pop(k) for k in list(kw) if k not in ("resume", "progress", "device",
                                                          "data_summary")}
    return train(default_config(method, **cfg_kw), train_set, val_set, out, **kw)


def train_all(train_set: SliceSet, val_set: SliceSet, out_dir: Path | str,
              methods: tuple[str, ...] = ALL_METHODS, **kw: Any) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {}
    for m in methods:
        p = out_dir / f"{m}.pt"
        train_method(m, train_set, val_set, p, **dict(kw))
        paths[m] = p
    return paths
