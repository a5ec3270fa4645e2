"""Training for every learned method of the harness, resumable, single process or DDP.

Phases (step counts in ``TrainConfig``):

* ``pretrain`` (methods ``multitask``, ``geometry_only``, ``vae_pretrained``): context restoration,
  the VAE gets patch-swapped slices and reconstructs the originals (``rec + beta * KL``).
* ``main``: ``multitask`` = ``L_geo + eps * (L_rec + beta * KL)`` on randomly transformed slices
  (the decoder reconstructs the transformed input); ``geometry_only`` = ``L_geo``; ``vae`` and
  ``vae_pretrained`` = ``rec + beta * KL``; ``cevae`` = VAE loss + ``ce_factor`` x restoration of
  context-encoding-noised slices.

After training, rank 0 calibrates on held-out normal validation series: normalisation statistics
of s_g/s_r, the operating thresholds (the ``target_specificity`` quantile of the normal
validation series scores, for max and top-k aggregation) and the 5 %-voxel-FPR pixel threshold.

DDP: run under ``torchrun`` (``WORLD_SIZE`` > 1): gloo on CPU, NCCL on CUDA; each rank draws its
own batches from its own generator; rank 0 writes checkpoints. ``python -m triage_model.train --random N``
trains on random tensors (smoke test of the launcher).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from triage_model import losses, pretext
from triage_model.baselines import DISPLAY_NAMES, METHODS, detector_for, near_bone
from triage_model.checkpoint import (
    CheckpointError,
    make_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from triage_model.network import NetConfig, build_network
from triage_model.options import ALL_METHODS, add_override_options, overrides_from_args
from triage_model.scoring import (
    NormStats,
    ScoringConfig,
    aggregate,
    apply_slice_context,
    atlas_heights,
    smooth,
)
from triage_model.thresholds import threshold_for_specificity

log = logging.getLogger(__name__)

PRETRAINED_METHODS = {"multitask", "geometry_only", "vae_pretrained"}


@dataclass
class TrainConfig:
    method: str = "multitask"
    net: NetConfig = field(default_factory=NetConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    pretrain_steps: int = 600
    steps: int = 2400
    batch_size: int = 32
    lr: float = 5e-4
    # the last ``lr_decay_steps`` steps lower the learning rate linearly towards zero (0 = a
    # constant rate throughout); resuming a run with more steps and this set anneals it
    lr_decay_steps: int = 0
    # the last fraction of the run lowers it linearly towards zero; the run's progress is the
    # larger of steps done / planned and, under a time budget, wall time spent / budget, so a
    # run that the budget stops is annealed too (0 = off)
    lr_decay_fraction: float = 0.0
    weight_decay: float = 0.0
    eps: float = 0.05  # weight of the reconstruction (+KL) term in the multitask loss
    beta: float = 0.1  # KL weight
    n_swaps: int = 4  # context-restoration swaps per slice
    ce_factor: float = 0.5  # ceVAE restoration term weight
    noise_res: int = 16  # dae: side of the coarse noise grid
    # dae: > 0 = each training slice draws its noise grid side from {noise_res, noise_res_alt}
    # with equal odds (two blob scales, e.g. 16 and 32 for small lesions too); 0 = one scale
    noise_res_alt: int = 0
    noise_std: float = 0.2  # dae: noise standard deviation (brain-window units)
    # dae: > 0 = also paint 2-6 small spots into every training slice (``pretext.small_spots``)
    # and weight the squared error 1 + spot_weight inside them, so that the U-Net learns to
    # repair lesions smaller than the coarse noise's blobs; 0 = off (model card, "Training data")
    spot_weight: float = 0.0
    flip_aug: bool = True
    seed: int = 0
    ckpt_every: int = 200
    target_specificity: float = 0.95
    top_k: int = 3
    hu_quantile: float = 0.995
    num_threads: int = 0  # 0 = leave torch's default

    def total_steps(self) -> int:
        if self.method == "hu_threshold":
            return 0
        return (self.pretrain_steps if self.method in PRETRAINED_METHODS else 0) + self.steps

    def lr_at(self, step: int, time_fraction: float = 0.0) -> float:
        """Learning rate of the step that starts at ``step`` (0-based); ``time_fraction`` = share
        of a time budget already spent (0 without one)."""
        total, d, f = self.total_steps(), self.lr_decay_steps, self.lr_decay_fraction
        scale = 1.0
        if d > 0 and step >= total - d:
            scale = max(total - step, 0) / d
        if f > 0 and total:
            progress = max(step / total, time_fraction)
            if progress > 1.0 - f:
                scale = min(scale, max(1.0 - progress, 0.0) / f)
        return self.lr * scale

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["net"] = self.net.to_dict()
        d["scoring"] = self.scoring.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["net"] = NetConfig.from_dict(d.get("net", {}))
        kw["scoring"] = ScoringConfig.from_dict(d.get("scoring", {}))
        return cls(**kw)


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
    """Training configuration of ``method`` with a shared total step budget (a method with
    pretraining spends ``pretrain_fraction`` of it there, so every learned method sees the same
    number of optimisation steps).

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


@dataclass
class SliceSet:
    """Preprocessed slices: x (N,S,S) float32 in [0,1], brain (N,S,S) bool, series (N,) int,
    optionally hu (N,S,S) Hounsfield units (used by the HU-threshold baseline only)."""

    x: np.ndarray
    brain: np.ndarray
    series: np.ndarray
    hu: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def series_ids(self) -> list[int]:
        """The set's series ids, ascending (e.g. the held-out validation series of a split)."""
        return [int(i) for i in np.unique(self.series)]

    @property
    def n_series(self) -> int:
        return len(self.series_ids)

    def subset(self, series_ids: np.ndarray) -> SliceSet:
        keep = np.isin(self.series, series_ids)
        return SliceSet(self.x[keep], self.brain[keep], self.series[keep],
                        None if self.hu is None else self.hu[keep])

    def save(self, path: Path | str, summary: dict[str, Any] | None = None) -> None:
        """Write a compact slice archive (x quantised to 8 bits, brain masks bit-packed, no HU)
        that ``load`` reads back: the way to move training data to a GPU machine that has
        PyTorch but not the DICOM stack (``python -m triage_model.train --slices FILE``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(
            tmp, format=np.array("triage-slices/1"),
            x=np.round(np.clip(self.x, 0.0, 1.0) * 255.0).astype(np.uint8),
            brain=np.packbits(self.brain.astype(bool), axis=None), shape=np.array(self.x.shape),
            series=self.series.astype(np.int32),
            summary=np.array(json.dumps(summary or {})),
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path | str) -> tuple[SliceSet, dict[str, Any]]:
        """Read a slice archive written by ``save``; returns the set and its data summary."""
        with np.load(Path(path)) as z:
            if "format" not in z.files or str(z["format"]) != "triage-slices/1":
                raise ValueError(f"{path} is not a slice archive (triage-slices/1)")
            shape = tuple(int(v) for v in z["shape"])
            n = int(np.prod(shape))
            brain = np.unpackbits(z["brain"], count=n).astype(bool).reshape(shape)
            x = z["x"].astype(np.float32) / 255.0
            return cls(x, brain, z["series"].astype(np.int64)), json.loads(str(z["summary"]))

    @classmethod
    def concat(cls, sets: list[SliceSet]) -> SliceSet:
        """One set from several; series ids are renumbered so that no two sets share one."""
        shapes = sorted({tuple(s.x.shape[1:]) for s in sets})
        if len(shapes) > 1:
            raise ValueError(f"slice sets of different slice sizes cannot be combined: {shapes} "
                             "(export them with the same --input-size)")
        series, base = [], 0
        for s in sets:
            _, inv = np.unique(s.series, return_inverse=True)
            series.append(inv.reshape(-1) + base)
            base += s.n_series
        hu = None if any(s.hu is None for s in sets) else np.concatenate([s.hu for s in sets])
        return cls(np.concatenate([s.x for s in sets]), np.concatenate([s.brain for s in sets]),
                   np.concatenate(series).astype(np.int64), hu)

    def split(self, val_fraction: float, seed: int) -> tuple[SliceSet, SliceSet]:
        ids = np.unique(self.series)
        rng = np.random.default_rng(seed)
        rng.shuffle(ids)
        n_val = max(1, int(round(val_fraction * len(ids)))) if len(ids) > 1 else 0
        return self.subset(ids[n_val:]), self.subset(ids[:n_val])


# ------------------------------------------------------------------------------------ distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if world <= 1:
        return Dist(device=torch.device("cuda" if want_cuda else "cpu"))
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return Dist(rank, world, local, dev)


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    return net.module if isinstance(net, DDP) else net  # type: ignore[return-value]


# ---------------------------------------------------------------------------------- step function


class Trainer:
    """Owns the network, optimiser and generator; ``step()`` runs one optimisation step."""

    def __init__(self, cfg: TrainConfig, data: SliceSet, dd: Dist | None = None) -> None:
        if cfg.method not in METHODS or cfg.method == "hu_threshold":
            raise ValueError(f"Trainer trains the learned methods, not {cfg.method!r}")
        if data.x.shape[1:] != (cfg.net.input_size, cfg.net.input_size):
            raise ValueError(f"slices are {data.x.shape[1:]}, network expects "
                             f"{cfg.net.input_size}x{cfg.net.input_size}")
        self.cfg, self.data = cfg, data
        self.dd = dd or Dist()
        uses_geo = METHODS[cfg.method]["geo"]
        net_cfg = NetConfig.from_dict({**cfg.net.to_dict(), "geo_head": uses_geo,
                                       "arch": "unet" if cfg.method == "dae" else "vae"})
        self.cfg.net = net_cfg
        torch.manual_seed(cfg.seed * 1000 + self.dd.rank)
        self.net: torch.nn.Module = build_network(net_cfg).to(self.dd.device)
        if self.dd.world > 1:
            self.net = DDP(self.net, device_ids=[self.dd.local_rank] if self.dd.device.type == "cuda"
                           else None, find_unused_parameters=True)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + 17 + self.dd.rank)
        self.step_no = 0
        self.history: list[dict[str, float]] = []
        self.x_all = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32))
        self.m_all = torch.from_numpy(np.ascontiguousarray(data.brain, dtype=bool))

    @property
    def model(self) -> torch.nn.Module:
        return _unwrap(self.net)

    def phase(self, step: int | None = None) -> str:
        s = self.step_no if step is None else step
        pre = self.cfg.pretrain_steps if self.cfg.method in PRETRAINED_METHODS else 0
        return "pretrain" if s < pre else "main"

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.data), (self.cfg.batch_size,), generator=self.gen)
        x, m = self.x_all[idx], self.m_all[idx]
        if self.cfg.flip_aug:
            flip = torch.rand(len(idx), generator=self.gen) < 0.5
            x = torch.where(flip[:, None, None], x.flip(-1), x)
            m = torch.where(flip[:, None, None], m.flip(-1), m)
        return x, m

    def make_inputs(self, x: torch.Tensor, m: torch.Tensor, phase: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(input, target, labels, extra) for one step, on CPU."""
        c = self.cfg
        if phase == "pretrain":
            corrupted, _ = pretext.patch_swap(x, m, self.gen, n_swaps=c.n_swaps)
            return corrupted, x, None, None
        if c.method in ("multitask", "geometry_only"):
            labels = pretext.random_labels(len(x), self.gen)
            xt = pretext.apply_transforms(x, labels)
            return xt, xt, labels, None
        if c.method == "cevae":
            return x, x, None, pretext.context_encoding_noise(x, self.gen)
        if c.method == "dae":
            noisy = pretext.coarse_noise(x, self.gen, c.noise_res, c.noise_std, mask=m)
            if c.noise_res_alt > 0:
                alt = pretext.coarse_noise(x, self.gen, c.noise_res_alt, c.noise_std, mask=m)
                pick = torch.rand(len(x), generator=self.gen) < 0.5
                noisy = torch.where(pick.view(-1, *([1] * (x.dim() - 1))), alt, noisy)
            if c.spot_weight > 0:
                sp = pretext.small_spots(m, self.gen)
                noisy = noisy + sp
                weight = 1.0 + c.spot_weight * (sp.abs() > pretext.SPOT_WEIGHT_THRESHOLD).float()
                return noisy, x, None, weight
            return noisy, x, None, None
        return x, x, None, None

    def step(self, time_fraction: float = 0.0) -> dict[str, float]:
        c, dev = self.cfg, self.dd.device
        phase = self.phase()
        lr = c.lr_at(self.step_no, time_fraction)
        for g in self.opt.param_groups:
            g["lr"] = lr
        x, m = self.batch()
        inp, tgt, labels, extra = self.make_inputs(x, m, phase)
        inp, tgt = inp.to(dev).unsqueeze(1), tgt.to(dev).unsqueeze(1)
        self.net.train()
        if phase == "pretrain" or c.method in ("vae", "vae_pretrained"):
            terms = losses.vae_loss(self.net(inp), tgt, c.beta)
        elif c.method == "dae":
            w = None if extra is None else extra.to(dev).unsqueeze(1)
            rec_l = losses.rec_loss(self.net(inp).recon, tgt, w)
            terms = {"loss": rec_l, "rec": rec_l.detach()}
        elif c.method in ("multitask", "geometry_only"):
            eps = c.eps if c.method == "multitask" else 0.0
            out = self.net(inp, decode=eps > 0)
            assert labels is not None
            terms = losses.multitask_loss(out, tgt, labels.to(dev), eps, c.beta)
        elif c.method == "cevae":
            assert extra is not None
            # one forward over clean + noised slices (DDP wants one forward per backward)
            both = torch.cat([inp, extra.to(dev).unsqueeze(1)], 0)
            out = self.net(both)
            b = inp.shape[0]
            rec_clean = losses.rec_loss(out.recon[:b], tgt)
            kl = losses.kl_loss(out.mu[:b], out.logvar[:b])
            rec_ce = losses.rec_loss(out.recon[b:], tgt)
            terms = {"loss": rec_clean + c.beta * kl + c.ce_factor * rec_ce,
                     "rec": rec_clean.detach(), "kl": kl.detach(), "rec_ce": rec_ce.detach()}
        else:  # pragma: no cover
            raise ValueError(c.method)
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 100.0)
        self.opt.step()
        self.step_no += 1
        rec = {k: float(v.detach()) for k, v in terms.items()}
        rec["step"] = self.step_no
        rec["lr"] = lr
        return rec

    # ------------------------------------------------------------------------- resumable state

    def state(self) -> dict[str, Any]:
        return {
            "cfg": self.cfg.to_dict(),
            "step": self.step_no,
            "net": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history[-2000:],
        }

    def load_state(self, st: dict[str, Any]) -> None:
        if st["cfg"]["method"] != self.cfg.method:
            raise ValueError(f"resume state is for method {st['cfg']['method']!r}, "
                             f"not {self.cfg.method!r}")
        self.model.load_state_dict(st["net"])
        self.opt.load_state_dict(st["opt"])
        self.gen.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        self.step_no = int(st["step"])
        self.history = list(st.get("history", []))


def _plain(obj: Any) -> Any:
    """JSON-safe copy (plain types only, so the checkpoint loads with weights_only=True)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def state_path(out: Path) -> Path:
    return out.with_name(out.stem + ".state.pt")


def _save_state(tr: Trainer, out: Path) -> None:
    buf = io.BytesIO()
    torch.save(tr.state(), buf)
    p = state_path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, p)


# ------------------------------------------------------------------------------------ calibration


def calibrate(ckpt: dict[str, Any], val: SliceSet, *, target_specificity: float = 0.95,
              top_k: int = 3, lambda_: float = 0.5, batch_size: int = 32,
              device: str = "cpu") -> dict[str, Any]:
    """Fill norm stats, thresholds and the pixel threshold of ``ckpt`` from normal val slices."""
    det = detector_for(ckpt, device=device)
    if len(val) == 0:
        log.warning("no validation slices: normalisation and thresholds left at defaults")
        return ckpt
    atlas = getattr(det, "atlas", None)
    kind = atlas.height if atlas is not None else "slice"
    g_raw, r_raw, heat = det.raw_scores(val.x, val.brain, batch_size, hu=val.hu,
                                        heights=atlas_heights(kind, val.brain, val.series))
    return calibrate_from_raw(ckpt, val, g_raw, r_raw, heat, target_specificity=target_specificity,
                              top_k=top_k, lambda_=lambda_)


def calibrate_from_raw(ckpt: dict[str, Any], val: SliceSet, g_raw: np.ndarray, r_raw: np.ndarray,
                       heat: np.ndarray, *, target_specificity: float = 0.95, top_k: int = 3,
                       lambda_: float = 0.5) -> dict[str, Any]:
    """Calibration from already computed raw validation scores (see ``calibrate``)."""
    area = val.brain.reshape(len(val), -1).mean(1)
    sc = ScoringConfig.from_dict(ckpt.get("scoring"))
    if sc.slice_context:  # as Detector.score does, series by series
        g_raw = apply_slice_context(g_raw, sc.slice_context, val.series)
        r_raw = apply_slice_context(r_raw, sc.slice_context, val.series)
    norm_bins = sc.norm_bins
    ckpt["norm"] = NormStats.fit(g_raw, r_raw, area, norm_bins).to_dict()
    det = detector_for(ckpt, device="cpu")
    score, _, _ = det.normalise(g_raw, r_raw, lambda_, area)
    ser_max, ser_top = [], []
    for sid in np.unique(val.series):
        s = score[val.series == sid]
        ser_max.append(aggregate(s, "max"))
        ser_top.append(aggregate(s, "topk_mean", top_k))
    q = float(target_specificity)
    ckpt["thresholds"] = {"max": threshold_for_specificity(ser_max, q),
                          "topk_mean": threshold_for_specificity(ser_top, q)}
    vox = heat[val.brain]
    ckpt["pixel_threshold"] = float(np.quantile(vox, 0.95)) if vox.size else None
    ckpt["calibration"] = {
        "val_series": int(len(ser_max)), "val_slices": int(len(val)),
        "target_specificity": q, "lambda": lambda_, "top_k": top_k,
        "val_series_scores_max": [float(v) for v in ser_max],
    }
    return ckpt


def fit_hu_threshold(train: SliceSet, quantile: float = 0.995, calcification_hu: float = 100.0,
                     presmooth: float = 1.0, bone_margin_px: int = 2) -> dict[str, float]:
    """Hyperdense threshold fitted on normal brain pixels.

    The slices are first denoised (Gaussian, ``presmooth`` pixels); the lower bound is the
    ``quantile`` of the normal brain pixels below calcification density and more than
    ``bone_margin_px`` from bone (partial volume at the inner table). In HU when the slices
    carry HU (band [q, 100 HU]: acute blood is 50-90 HU, calcification above), else in
    brain-window units with saturated pixels (>= 0.98) excluded.
    """
    def smoothed(a: np.ndarray) -> np.ndarray:
        out = np.empty(a.shape, np.float32)
        for s in range(0, len(a), 256):
            out[s:s + 256] = smooth(torch.from_numpy(np.asarray(a[s:s + 256], np.float32)),
                                    presmooth).numpy()
        return out

    vx = smoothed(train.x)[train.brain]
    vx = vx[vx < 0.98]
    out = {"hi": float(np.quantile(vx, quantile)) if vx.size else 0.8, "top": 0.98,
           "quantile": quantile, "presmooth": presmooth}
    if train.hu is not None:
        away = np.concatenate([
            ~near_bone(torch.from_numpy(np.asarray(train.hu[s:s + 256], np.float32)),
                       calcification_hu, bone_margin_px).numpy()
            for s in range(0, len(train.hu), 256)])
        hv = smoothed(train.hu)[train.brain & away]
        hv = hv[hv < calcification_hu]
        out["bone_margin_px"] = bone_margin_px
        if hv.size:
            out["hu_lo"] = float(np.quantile(hv, quantile))
            out["hu_hi"] = float(calcification_hu)
    return out


# ----------------------------------------------------------------------------------- fine-tuning


def fine_tune(ckpt: dict[str, Any], data: SliceSet, *, steps: int, lr: float = 1e-4,
              batch_size: int = 8, seed: int = 0, device: str | torch.device = "cpu",
              time_budget_s: float | None = None,
              progress: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A copy of the denoising checkpoint ``ckpt`` whose network is fine-tuned on ``data``
    (a site's normal slices) with the objective it was trained with (coarse noise, flips).

    Every member of an ensemble takes the same batches, each with its own denoising loss, so the
    members stay separate networks whose reconstructions the ensemble averages. ``steps`` at a
    small constant ``lr`` (fresh Adam); ``time_budget_s`` stops earlier at a step boundary.
    ``progress(iterable, desc, total)`` wraps the step loop (a progress bar). Returns the new
    checkpoint (normalisation, atlas and thresholds still those of ``ckpt``: refit and
    recalibrate afterwards) and a record of the run for its training summary."""
    if ckpt.get("method") != "dae" or "state_dict" not in ckpt:
        raise ValueError(f"fine-tuning needs a denoising U-Net checkpoint (method 'dae'), not "
                         f"{ckpt.get('method')!r}")
    if steps < 1:
        raise ValueError(f"fine-tuning needs at least one step, got {steps}")
    if len(data) == 0:
        raise ValueError("no slices to fine-tune on")
    dev = torch.device(device)
    net_cfg = NetConfig.from_dict(ckpt["net_config"])
    if data.x.shape[1:] != (net_cfg.input_size, net_cfg.input_size):
        raise ValueError(f"slices are {data.x.shape[1:]}, the network expects "
                         f"{net_cfg.input_size}x{net_cfg.input_size}")
    net = build_network(net_cfg)
    net.load_state_dict(ckpt["state_dict"])
    net.to(dev).train()
    members = list(getattr(net, "members", None) or [net])
    noise = TrainConfig(**DAE_DEFAULTS)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    x_all = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32))
    m_all = torch.from_numpy(np.ascontiguousarray(data.brain, dtype=bool))
    t0 = time.time()
    losses_seen: list[float] = []
    done = 0
    steps_iter: Any = range(steps)
    if progress is not None:
        steps_iter = progress(steps_iter, "fine-tune the network", steps)
    for _ in steps_iter:
        if time_budget_s is not None and time.time() - t0 > time_budget_s:
            log.warning("fine-tuning's time budget of %.0f s spent after %d of %d steps",
                        time_budget_s, done, steps)
            break
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        x, m = x_all[idx], m_all[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip[:, None, None], x.flip(-1), x)
        m = torch.where(flip[:, None, None], m.flip(-1), m)
        noisy = pretext.coarse_noise(x, gen, noise.noise_res, noise.noise_std, mask=m)
        inp, tgt = noisy.unsqueeze(1).to(dev), x.unsqueeze(1).to(dev)
        loss = torch.stack([losses.rec_loss(mb(inp).recon, tgt) for mb in members]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 100.0)
        opt.step()
        losses_seen.append(float(loss.detach()) / len(members))
        done += 1
    if hasattr(steps_iter, "close"):
        steps_iter.close()
    out = dict(ckpt)
    out["state_dict"] = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    tail = losses_seen[-max(1, min(20, len(losses_seen))):]
    head = losses_seen[:max(1, min(20, len(losses_seen)))]
    record = {"steps": done, "planned_steps": steps, "lr": lr, "batch_size": batch_size,
              "seed": int(seed), "slices": len(data), "series": data.n_series,
              "members": len(members), "device": str(dev),
              "seconds": round(time.time() - t0, 1),
              "rec_loss_first": float(np.mean(head)), "rec_loss_last": float(np.mean(tail))}
    training = dict(out.get("training") or {})
    training["fine_tune"] = record
    out["training"] = training
    return out, record


# --------------------------------------------------------------------------------------- driver


def init_state_dict(ck: dict[str, Any], path: Path | str, member: int | None = None
                    ) -> dict[str, Any]:
    """The network weights to fine-tune from: the file's network, or member ``member``
    (1-based) of an ensemble file (the bundled model is a mean of four U-Nets: one network is
    trained at a time, so one of them must be chosen)."""
    members = (ck.get("net_config") or {}).get("members") or ()
    if (ck.get("net_config") or {}).get("arch") == "ensemble":
        if member is None:
            raise ValueError(f"{path} is an ensemble of {len(members)} U-Nets; fine-tuning "
                             "trains one network: add --init-member K to start from member K "
                             f"(1-{len(members)})")
        if not 1 <= member <= len(members):
            raise ValueError(f"--init-member {member}: {path} has members 1-{len(members)}")
        prefix = f"members.{member - 1}."
        return {k[len(prefix):]: v for k, v in ck["state_dict"].items() if k.startswith(prefix)}
    if member is not None:
        raise ValueError(f"--init-member: {path} holds one network, not an ensemble; "
                         "drop --init-member")
    return dict(ck["state_dict"])


def train(
    cfg: TrainConfig,
    train_set: SliceSet,
    val_set: SliceSet,
    out: Path | str,
    *,
    resume: bool = False,
    progress: bool = True,
    device: str = "auto",
    data_summary: dict[str, Any] | None = None,
    time_budget_s: float | None = None,
    init_from: Path | str | None = None,
    init_member: int | None = None,
) -> dict[str, Any] | None:
    """Train ``cfg.method`` and write the calibrated checkpoint to ``out`` (rank 0).

    ``time_budget_s`` stops the loop early (at a step boundary, single process only) when the
    wall-clock budget is spent; the checkpoint then records the steps actually run, and
    ``--steps`` that number reproduces it. ``init_from`` starts the network from a checkpoint's
    weights (same method and layer shapes; a fresh optimiser; fine-tuning). The denoising U-Net
    is fully convolutional, so its weights may start a network of another input size (e.g. a
    128-px member fine-tuned at 256 px). Returns the checkpoint dict on rank 0, None on the
    other ranks.
    """
    out = Path(out)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    dd = setup_distributed(device)
    t0 = time.time()
    summary = {
        "method": cfg.method, "train_slices": len(train_set), "train_series": train_set.n_series,
        "val_slices": len(val_set), "val_series": val_set.n_series,
        "world_size": dd.world, "device": str(dd.device), "torch": str(torch.__version__),
        "train_config": cfg.to_dict(), "data": data_summary or {},
    }
    if cfg.method == "hu_threshold":
        return _fit_hu_threshold_checkpoint(cfg, train_set, val_set, out, dd, summary, t0)
    if init_member is not None and init_from is None:
        raise ValueError("--init-member chooses a member of the --init file: give --init too")
    tr = Trainer(cfg, train_set, dd)
    if init_from is not None and not (resume and state_path(Path(out)).exists()):
        summary["init_from"] = _start_from(tr, init_from, init_member)
    sp = state_path(out)
    if resume and sp.exists():
        st = torch.load(sp, map_location="cpu", weights_only=False)
        tr.load_state(st)
        log.info("resumed %s at step %d from %s", cfg.method, tr.step_no, sp)
    summary.update(_run_steps(tr, out, t0, progress=progress, time_budget_s=time_budget_s))
    if dd.world > 1:
        dist.barrier()
    if not dd.main:
        return None
    _save_state(tr, out)
    net = tr.model.cpu()
    ck = make_checkpoint(cfg.method, net=net, scoring=cfg.scoring, training=summary,
                         display_name=DISPLAY_NAMES[cfg.method])
    ck = calibrate(ck, val_set, target_specificity=cfg.target_specificity, top_k=cfg.top_k,
                   device="cuda" if dd.device.type == "cuda" else "cpu")
    summary["wall_s"] = time.time() - t0
    ck["training"] = _plain(summary)
    save_checkpoint(ck, out)
    log.info("wrote %s (%s, %d steps, %.0f s)", out, cfg.method, tr.step_no, summary["wall_s"])
    return ck


def _fit_hu_threshold_checkpoint(cfg: TrainConfig, train_set: SliceSet, val_set: SliceSet,
                                 out: Path, dd: Dist, summary: dict[str, Any],
                                 t0: float) -> dict[str, Any]:
    """The HU-threshold baseline: fitted, not trained; calibrated and written like the others."""
    ck = make_checkpoint("hu_threshold", hu=fit_hu_threshold(train_set, cfg.hu_quantile),
                         scoring=cfg.scoring, input_size=cfg.net.input_size, training=summary,
                         display_name=DISPLAY_NAMES["hu_threshold"])
    ck = calibrate(ck, val_set, target_specificity=cfg.target_specificity, top_k=cfg.top_k)
    summary["wall_s"] = time.time() - t0
    ck["training"] = _plain(summary)
    if dd.main:
        save_checkpoint(ck, out)
    return ck


def _start_from(tr: Trainer, init_from: Path | str, init_member: int | None) -> dict[str, Any]:
    """Load ``init_from``'s weights (member ``init_member`` of an ensemble) into the trainer's
    network; returns the record of it for the checkpoint's training summary."""
    cfg = tr.cfg
    init_ck, init_sha = read_checkpoint(init_from)
    if init_ck.get("method") != cfg.method:
        raise ValueError(f"{init_from}: a {init_ck.get('method')!r} checkpoint cannot start "
                         f"a {cfg.method!r} network")
    if "state_dict" not in init_ck:
        raise ValueError(f"{init_from}: holds no network weights to start from")
    try:
        tr.model.load_state_dict(init_state_dict(init_ck, init_from, init_member))
    except RuntimeError as e:
        raise ValueError(f"{init_from}: its network does not match this configuration "
                         f"(--base-channels, input size): {str(e).splitlines()[0]}") from None
    log.info("network starts from %s (%s)", init_from, init_sha[:12])
    return {"file": Path(init_from).name, "sha256": init_sha,
            **({"member": init_member} if init_member else {})}


def _run_steps(tr: Trainer, out: Path, t0: float, *, progress: bool,
               time_budget_s: float | None) -> dict[str, Any]:
    """The optimisation loop to ``cfg.total_steps()`` (or the time budget), with the progress
    bar and periodic training states; returns the loop's part of the training summary."""
    cfg, dd = tr.cfg, tr.dd
    total = cfg.total_steps()
    bar = None
    if progress and dd.main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=tr.step_no, desc=f"train {cfg.method}", unit="step",
                   mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
    t_loop = time.time()
    start_step = tr.step_no
    stopped_early = False
    pre_share = (cfg.pretrain_steps / total) if total and cfg.method in PRETRAINED_METHODS else 0.0
    while tr.step_no < total:
        if (time_budget_s is not None and dd.world == 1 and pre_share
                and tr.phase() == "pretrain"
                and time.time() - t_loop > pre_share * (time_budget_s - (t_loop - t0))):
            # a time budget also bounds the pretraining phase to its share of the budget, or a
            # budget shorter than the planned steps would end inside pretraining
            log.info("pretraining's share of the time budget spent: main phase from step %d",
                     tr.step_no)
            cfg.steps, cfg.pretrain_steps = total - tr.step_no, tr.step_no
        # one clock read per step serves the stop and the learning-rate decay; single process
        # only, as every rank must step with the same learning rate
        tf = 0.0
        if time_budget_s is not None and dd.world == 1:
            elapsed = time.time() - t0
            if elapsed > time_budget_s:
                stopped_early = True
                log.warning("time budget of %.0f s spent: stopping at step %d of %d",
                            time_budget_s, tr.step_no, total)
                break
            tf = elapsed / max(time_budget_s, 1e-9)
        rec = tr.step(tf)
        if rec["step"] % 10 == 0 or tr.step_no == total:
            rec["phase"] = 0.0 if tr.phase(tr.step_no - 1) == "pretrain" else 1.0
            tr.history.append(rec)
        if bar is not None:
            bar.update(1)
            if tr.step_no % 10 == 0:
                bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items()
                                 if k in ("loss", "rec", "geo", "acc", "kl")})
        if dd.main and cfg.ckpt_every and tr.step_no % cfg.ckpt_every == 0:
            _save_state(tr, out)
    if bar is not None:
        bar.close()
    loop_s = time.time() - t_loop
    return {
        **({"resumed_at_step": start_step} if start_step else {}),
        "steps": tr.step_no,
        "planned_steps": total,
        "train_config": cfg.to_dict(),  # pretrain_steps as run (a time budget moves it)
        "stopped_by_time_budget": stopped_early,
        "loop_s": loop_s,
        "slices_per_s": (tr.step_no - start_step) * cfg.batch_size * dd.world / max(loop_s, 1e-9),
        "final_losses": tr.history[-1] if tr.history else {},
    }


def random_slices(n: int, size: int, seed: int, n_series: int = 4) -> SliceSet:
    """Blob phantoms for smoke tests: a bright disc (head) with a random inner texture."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    x = np.zeros((n, size, size), np.float32)
    brain = np.zeros((n, size, size), bool)
    for i in range(n):
        r = 0.3 + 0.05 * g.random()
        d = np.sqrt(yy**2 + (xx * (1 + 0.2 * g.random())) ** 2)
        b = d < r
        x[i][d < r + 0.04] = 1.0
        x[i][b] = 0.4 + 0.05 * g.standard_normal(b.sum())
        brain[i] = b
    return SliceSet(np.clip(x, 0, 1), brain, np.arange(n) % n_series)


def _parser() -> argparse.ArgumentParser:
    """The options of ``python -m triage_model.train`` (see ``main``)."""
    ap = argparse.ArgumentParser(prog="python -m triage_model.train")
    ap.add_argument("out", type=Path)
    ap.add_argument("--random", type=int, default=64, help="number of random phantom slices")
    ap.add_argument("--slices", type=Path, default=None,
                    help="slice archive (triage-agent train --export-slices) instead of phantoms")
    ap.add_argument("--more-slices", type=Path, nargs="+", default=[], metavar="FILE",
                    help="with --slices: further archives used for training only; the validation "
                         "series (calibration) are split from --slices alone, so adding data "
                         "keeps them held out")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--method", default="multitask", choices=sorted(METHODS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pretrain-steps", type=int, default=2)
    ap.add_argument("--pretrain-fraction", type=float, default=0.2,
                    help="with --slices: share of --steps spent on pretraining")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1000, help="with --slices: split and training seed")
    ap.add_argument("--split-seed", type=int, default=None,
                    help="with --slices: seed of the training/validation split alone (default: "
                         "--seed); keep it fixed and vary --seed to train replicas of one model on "
                         "the same split, e.g. for an ensemble calibrated on the same held-out "
                         "series")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--base-channels", type=int, default=None)
    ap.add_argument("--noise-std", type=float, default=None, help="dae: coarse noise std")
    ap.add_argument("--noise-res", type=int, default=None, help="dae: coarse noise grid side")
    ap.add_argument("--noise-res-alt", type=int, default=None,
                    help="dae: a second grid side; each slice draws one of the two (0 = off)")
    ap.add_argument("--init", type=Path, default=None, metavar="CKPT",
                    help="with --slices: start the network from this checkpoint's weights "
                         "(fine-tuning; fresh optimiser and step count)")
    ap.add_argument("--init-member", type=int, default=None, metavar="K",
                    help="with --init of an ensemble file (the bundled model): start from its "
                         "K-th U-Net (1-based)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="with --slices: stop early when this much wall time is spent")
    add_override_options(ap)  # with --slices: --lr, --lr-decay-*, --spot-weight, --rec-q, ...
    ap.add_argument("--resume", action="store_true",
                    help="with --slices: continue from OUT's .state.pt (to --steps in total)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Launcher without the DICOM stack (PyTorch + NumPy only), also under ``torchrun``.

    * smoke test: ``torchrun --nproc_per_node 2 -m triage_model.train --random 64 --steps 3 OUT``
      (a tiny network on random phantoms);
    * real training from a slice archive written by ``triage-agent train --export-slices``:
      ``python -m triage_model.train OUT --slices train.npz --method dae --steps 6000 --seed 1000``
      (same split, configuration and calibration as ``triage-agent train``; full-size network).
    """
    ap = _parser()
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if a.slices is not None:
        data, summary = SliceSet.load(a.slices)
        split_seed = a.seed if a.split_seed is None else a.split_seed
        tr, va = data.split(a.val_fraction, seed=split_seed)
        summary.update(train_slices=len(tr), val_slices=len(va), slices_file=a.slices.name,
                       split_seed=split_seed,
                       val_series_ids=va.series_ids)
        if a.more_slices:
            more = [SliceSet.load(f) for f in a.more_slices]
            tr = SliceSet.concat([tr] + [m for m, _ in more])
            keep = ("source", "normals", "seed", "matrix")
            summary.update(train_slices=len(tr), more_slices=[
                {"file": f.name, "slices": len(m), "series": m.n_series,
                 **{k: v for k, v in sm.items() if k in keep}}
                for f, (m, sm) in zip(a.more_slices, more, strict=True)])
        net = NetConfig(input_size=int(data.x.shape[-1]))
        if a.base_channels:
            net = replace(net, base_channels=a.base_channels)
        over = overrides_from_args(a, ("noise_std", "noise_res", "noise_res_alt"))
        cfg = default_config(a.method, total_steps=a.steps, pretrain_fraction=a.pretrain_fraction,
                             batch_size=a.batch_size, seed=a.seed, num_threads=a.threads,
                             net=net, **over)
        try:
            ck = train(cfg, tr, va, a.out, progress=a.progress, device=a.device,
                       data_summary=summary, time_budget_s=a.time_budget, resume=a.resume,
                       init_from=a.init, init_member=a.init_member)
        except (ValueError, CheckpointError) as e:  # a bad --init file: say why, no traceback
            print(f"error: {e}", file=sys.stderr)
            return 2
        if ck is not None:
            t = ck["training"]
            print(f"wrote {a.out}: {a.method} {t['steps']} steps, {t['wall_s']:.0f} s, "
                  f"{t['slices_per_s']:.0f} slices/s on {t['device']}, "
                  f"threshold(max) {ck['thresholds'].get('max', float('nan')):.3f}", flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 0
    cfg = TrainConfig(method=a.method, net=NetConfig(input_size=a.size, base_channels=4,
                                                     max_channels=16, z_dim=8, geo_hidden=16),
                      steps=a.steps, pretrain_steps=a.pretrain_steps, batch_size=a.batch_size,
                      num_threads=a.threads, ckpt_every=0)
    data = random_slices(a.random, a.size, seed=0)
    tr, va = data.split(0.25, seed=0)
    ck = train(cfg, tr, va, a.out, progress=False)
    if ck is not None:
        print(f"rank0 done: world={ck['training']['world_size']} steps={ck['training']['steps']}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
