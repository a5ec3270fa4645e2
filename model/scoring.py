"""Anomaly scores: pure functions from network outputs to slice, series and pixel scores.

Slice score (seed paper): ``score = (1 - lambda) * s_g + lambda * s_r`` where

* ``s_g`` is the geometric head's error at predicting the applied transform, averaged over all 20
  test-time transforms (``1 - p(correct class)`` by default, or the cross-entropy);
* ``s_r`` is the reconstruction error inside the brain mask: the mean of the top ``rec_q`` fraction
  of the smoothed absolute residual (``rec_stat="topq"``), or its plain mean (``"mean"``).

Both raw values are z-normalised with the mean/std measured on normal validation slices (stored in
the checkpoint), so that lambda weighs two quantities on the same scale: a normal slice scores
about 0 and a score of 3 is three normal standard deviations out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: what a residual atlas's height bands are bands of (``ResidualAtlas.height``)
ATLAS_HEIGHTS = ("slice", "brain_volume")


@dataclass(frozen=True)
class ScoringConfig:
    smooth_sigma: float = 1.5  # Gaussian sigma (pixels) applied to the residual map
    rec_stat: str = "topq"  # "topq" | "mean"
    rec_q: float = 0.01
    geo_error: str = "one_minus_p"  # "one_minus_p" | "ce"
    residual: str = "abs"  # "abs" | "squared"
    norm_bins: int = 0  # > 0: normalise per quantile bin of the slice's brain-area fraction
    # reconstruction = mean of the network's output for the slice and for its left-right mirror
    # image (mirrored back), at twice the cost; chosen for the bundled model on a development
    # set (docs/experiments.md). Meant for networks trained with flip augmentation (the default).
    flip_tta: bool = False
    # s_r = max(z of the residual, z of its asymmetric part): the residual that the mirrored
    # place on the other side of the fitted midline does not show (model/symmetry.py)
    symmetry: bool = False
    # slice context: each slice's raw statistics become (s_i + w (s_{i-1} + s_{i+1})) / (1 + 2w)
    # within its series, before the z-normalisation (``apply_slice_context``). A lesion spans
    # adjacent slices, the normal residual's slice-to-slice scatter does not. 0 = off. The heat
    # maps stay per slice. The bundled model does not use it: on a development set it raised
    # slice AUROC but not series AUROC (docs/experiments.md).
    slice_context: float = 0.0
    # residual atlas: the slice statistic is taken of the pixel-wise z-map
    # (h - mu_b(p)) / (sd_b(p) + eps) instead of the smoothed residual h itself, where mu_b, sd_b
    # are h's mean and spread at pixel p on normal slices at the same relative height in their
    # series (``atlas_bins`` equal bins; ``ResidualAtlas``, stored in the checkpoint with its own
    # eps and smoothing). Places where normal anatomy always leaves residual (skull base, bone
    # edges) count for less. The heat map stays h. 0 = off; the bundled model uses 16
    # (docs/experiments.md).
    atlas_bins: int = 0

    def __post_init__(self) -> None:
        if not self.slice_context >= 0:
            raise ValueError(f"slice_context must be >= 0, got {self.slice_context}")
        if self.atlas_bins < 0:
            raise ValueError(f"atlas_bins must be >= 0, got {self.atlas_bins}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ScoringConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in known})


@dataclass(frozen=True)
class NormStats:
    """Mean/std of the raw s_g and s_r on normal validation slices.

    With ``area_edges`` (``ScoringConfig.norm_bins`` > 0) the statistics are also kept per bin of
    the slice's brain-area fraction, so that a vertex or skull-base slice (small brain, more
    residual at bone and air interfaces) is compared with normal slices of its own kind.
    """

    g_mean: float = 0.0
    g_std: float = 1.0
    r_mean: float = 0.0
    r_std: float = 1.0
    area_edges: tuple[float, ...] = ()
    g_mean_bins: tuple[float, ...] = ()
    g_std_bins: tuple[float, ...] = ()
    r_mean_bins: tuple[float, ...] = ()
    r_std_bins: tuple[float, ...] = ()
    a_mean: float = 0.0  # the asymmetric residual's statistic (ScoringConfig.symmetry)
    a_std: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> NormStats:
        kw: dict[str, Any] = {}
        for k, v in (d or {}).items():
            if k in cls.__dataclass_fields__:
                kw[k] = tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)
        return cls(**kw)

    @staticmethod
    def _ms(a: np.ndarray) -> tuple[float, float]:
        a = np.asarray(a, dtype=np.float64)
        if a.size == 0:
            return 0.0, 1.0
        sd = float(a.std())
        return float(a.mean()), (sd if sd > 1e-12 else 1.0)

    @classmethod
    def fit(cls, g_raw: np.ndarray, r_raw: np.ndarray, area: np.ndarray | None = None,
            n_bins: int = 0, min_per_bin: int = 20) -> NormStats:
        """``r_raw`` (N,) or, with symmetry, (N,2): residual and asymmetric residual."""
        r_raw = np.asarray(r_raw)
        if r_raw.ndim == 2:
            am, asd = cls._ms(r_raw[:, 1])
            return replace(cls.fit(g_raw, r_raw[:, 0], area, n_bins, min_per_bin),
                           a_mean=am, a_std=asd)
        gm, gs = cls._ms(g_raw)
        rm, rs = cls._ms(r_raw)
        if not n_bins or area is None or len(area) < n_bins * min_per_bin:
            return cls(gm, gs, rm, rs)
        area = np.asarray(area, np.float64)
        edges = np.quantile(area, np.linspace(0, 1, n_bins + 1)[1:-1])
        b = np.searchsorted(edges, area, side="right")
        stats = [(cls._ms(np.asarray(g_raw)[b == i]), cls._ms(np.asarray(r_raw)[b == i]))
                 for i in range(n_bins)]
        return cls(gm, gs, rm, rs, tuple(float(e) for e in edges),
                   tuple(g[0] for g, _ in stats), tuple(g[1] for g, _ in stats),
                   tuple(r[0] for _, r in stats), tuple(r[1] for _, r in stats))

    def apply(self, g_raw: np.ndarray, r_raw: np.ndarray, area: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """z-scores of the raw terms (per brain-area bin when fitted that way); an (N,2)
        ``r_raw`` gives the larger of the residual's and the asymmetric residual's z."""
        g = np.asarray(g_raw, np.float64)
        r = np.asarray(r_raw, np.float64)
        if r.ndim == 2:
            zg, zr = self.apply(g, r[:, 0], area)
            za = ((r[:, 1] - self.a_mean) / self.a_std).astype(np.float32)
            return zg, np.maximum(zr, za)
        if self.area_edges and area is not None:
            b = np.searchsorted(np.asarray(self.area_edges), np.asarray(area), side="right")
            gm, gs = np.asarray(self.g_mean_bins)[b], np.asarray(self.g_std_bins)[b]
            rm, rs = np.asarray(self.r_mean_bins)[b], np.asarray(self.r_std_bins)[b]
            return ((g - gm) / gs).astype(np.float32), ((r - rm) / rs).astype(np.float32)
        return (((g - self.g_mean) / self.g_std).astype(np.float32),
                ((r - self.r_mean) / self.r_std).astype(np.float32))


def apply_slice_context(raw: np.ndarray, w: float, series: np.ndarray | None = None) -> np.ndarray:
    """Average each slice's raw statistic with its two neighbours' (weight ``w`` each, 1 for the
    slice itself) along axis 0.

    ``raw`` holds the slices of one series in slice order, or of several series with ``series``
    (N,) naming each slice's series (each series' slices in slice order). A series' first and
    last slice stand in for their missing neighbour. Extra axes (the symmetry option's (N,2)) are
    averaged column by column. ``w = 0`` returns the values unchanged.
    """
    a = np.asarray(raw, dtype=np.float64)
    if w < 0:
        raise ValueError(f"slice_context must be >= 0, got {w}")
    if w == 0 or a.shape[0] == 0:
        return np.asarray(raw, dtype=np.float32)
    out = np.empty_like(a)
    groups = [np.arange(a.shape[0])] if series is None else \
        [np.flatnonzero(np.asarray(series) == sid) for sid in np.unique(series)]
    for idx in groups:
        v = a[idx]
        prev = np.concatenate([v[:1], v[:-1]])
        nxt = np.concatenate([v[1:], v[-1:]])
        out[idx] = (v + w * (prev + nxt)) / (1.0 + 2.0 * w)
    return out.astype(np.float32)


def slice_heights(n_or_series: int | np.ndarray) -> np.ndarray:
    """Relative height of each slice in its series, ``(i + 0.5) / n`` for the i-th of n slices.

    An int ``n`` means one series of n slices in slice order; an array names each slice's series
    (each series' slices in slice order, as ``apply_slice_context`` takes them)."""
    if isinstance(n_or_series, (int, np.integer)):
        n = int(n_or_series)
        return ((np.arange(n) + 0.5) / max(n, 1)).astype(np.float32)
    series = np.asarray(n_or_series)
    h = np.zeros(len(series), np.float32)
    for sid in np.unique(series):
        idx = np.flatnonzero(series == sid)
        h[idx] = (np.arange(len(idx)) + 0.5) / len(idx)
    return h


def brain_volume_heights(brain: np.ndarray, series: np.ndarray | None = None) -> np.ndarray:
    """Height of each slice in the head as the share of its series' brain volume below the
    slice's centre: ``(sum of the brain areas of the slices below + half its own) / (sum of all)``.

    ``brain`` (N,S,S) masks in slice order (inferior first); ``series`` names each slice's series
    as in ``slice_heights`` (None: one series). Unlike the slice position it does not depend on
    where the scan starts and stops, on slice thickness, or on how many slices at the skull base
    or vertex pass the brain-fraction cut. A series without brain falls back to slice positions."""
    brain = np.asarray(brain)
    area = brain.reshape(len(brain), -1).sum(1).astype(np.float64)
    series = np.zeros(len(area), np.int64) if series is None else np.asarray(series)
    h = slice_heights(series)
    for sid in np.unique(series):
        idx = np.flatnonzero(series == sid)
        a = area[idx]
        total = a.sum()
        if total > 0:
            h[idx] = ((np.cumsum(a) - a / 2) / total).astype(np.float32)
    return h


def atlas_heights(kind: str, brain: np.ndarray, series: np.ndarray | None = None) -> np.ndarray:
    """Each slice's height as an atlas of ``kind`` (``ResidualAtlas.height``) bins it."""
    if kind == "slice":
        return slice_heights(len(brain) if series is None else np.asarray(series))
    if kind == "brain_volume":
        return brain_volume_heights(brain, series)
    raise ValueError(f"unknown atlas height {kind!r} (use one of {ATLAS_HEIGHTS})")


def height_bins(heights: np.ndarray | torch.Tensor, bins: int) -> torch.Tensor:
    """The height band (0 .. bins-1, equal widths over [0, 1]) of each relative slice height."""
    h = heights if isinstance(heights, torch.Tensor) else torch.as_tensor(np.asarray(heights))
    return (h.to(torch.float32) * bins).floor().clamp(0, bins - 1).to(torch.long)


@dataclass(frozen=True)
class ResidualAtlas:
    """Mean and spread of the normal smoothed residual at every pixel, per relative-height bin.

    ``mu``, ``sd``: (bins, S, S) float32; ``eps``: the floor added to ``sd``; ``sigma``: the
    smoothing (pixels) of the sums it was fitted from; ``height``: what its bins are bands of
    (``atlas_heights``): "slice", the slice's position among the series' brain slices,
    (i + 0.5) / n, or "brain_volume", the share of the series' brain volume below the slice's
    centre, which does not move when a site's scans start lower or higher or cut the head at
    another pitch. The bundled model's atlas uses "slice"; ``triage-agent onboard`` fits
    "brain_volume" (docs/experiments.md). Fitted with ``AtlasFitter`` on normal series; stored
    in the checkpoint under ``atlas`` (float16). See ``ScoringConfig.atlas_bins``."""

    mu: np.ndarray
    sd: np.ndarray
    eps: float = 0.002
    n_series: int = 0
    n_slices: int = 0
    sigma: float = 1.5
    height: str = "slice"

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"atlas eps must be > 0, got {self.eps}")
        if self.height not in ATLAS_HEIGHTS:
            raise ValueError(f"atlas height must be one of {ATLAS_HEIGHTS}, got {self.height!r}")

    @property
    def bins(self) -> int:
        return int(self.mu.shape[0])

    def zmap(self, heat: torch.Tensor, heights: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B,S,S) pixel-wise z of the smoothed residual ``heat`` for slices at ``heights`` (B,)."""
        if heat.shape[-2:] != self.mu.shape[-2:]:
            raise ValueError(f"atlas is {self.mu.shape[-1]}x{self.mu.shape[-2]}, maps are "
                             f"{heat.shape[-1]}x{heat.shape[-2]}")
        b = height_bins(heights, self.bins).to(heat.device)
        mu = torch.as_tensor(self.mu, device=heat.device)[b]
        sd = torch.as_tensor(self.sd, device=heat.device)[b]
        return (heat - mu) / (sd + self.eps)

    def to_dict(self) -> dict[str, Any]:
        return {"mu": torch.from_numpy(self.mu.astype(np.float16)),
                "sd": torch.from_numpy(self.sd.astype(np.float16)),
                "eps": float(self.eps), "n_series": int(self.n_series),
                "n_slices": int(self.n_slices), "sigma": float(self.sigma),
                "height": self.height}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ResidualAtlas:
        def arr(v: Any) -> np.ndarray:
            a = v.float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, np.float32)
            return np.ascontiguousarray(a, dtype=np.float32)

        mu, sd = arr(d["mu"]), arr(d["sd"])
        if mu.ndim != 3 or mu.shape != sd.shape:
            raise ValueError(f"atlas mu/sd must be (bins,S,S) alike; got {mu.shape}, {sd.shape}")
        return cls(mu, sd, float(d.get("eps", 0.002)), int(d.get("n_series", 0)),
                   int(d.get("n_slices", 0)), float(d.get("sigma", 1.5)),
                   str(d.get("height", "slice")))


class AtlasFitter:
    """Accumulates normal smoothed-residual maps by height bin; ``finish`` gives the atlas.
    ``height``: the kind of the heights that ``add`` is given (``ResidualAtlas.height``)."""

    def __init__(self, bins: int, size: int, height: str = "slice") -> None:
        if bins < 1:
            raise ValueError(f"an atlas needs at least one bin, got {bins}")
        if height not in ATLAS_HEIGHTS:
            raise ValueError(f"atlas height must be one of {ATLAS_HEIGHTS}, got {height!r}")
        self.bins, self.size, self.height = int(bins), int(size), height
        self.s1 = torch.zeros(bins, size, size, dtype=torch.float64)
        self.s2 = torch.zeros_like(self.s1)
        self.count = torch.zeros_like(self.s1)
        self.n_slices = 0
        self.series: set[Any] = set()

    def add(self, heat: torch.Tensor | np.ndarray, brain: torch.Tensor | np.ndarray,
            heights: np.ndarray, series: np.ndarray | None = None) -> None:
        h = torch.as_tensor(np.asarray(heat, np.float32)).to(torch.float64)
        m = torch.as_tensor(np.asarray(brain, bool)).to(torch.float64)
        h = h * m
        b = height_bins(heights, self.bins)
        self.s1.index_add_(0, b, h)
        self.s2.index_add_(0, b, h * h)
        self.count.index_add_(0, b, m)
        self.n_slices += int(h.shape[0])
        if series is not None:
            self.series.update(np.unique(np.asarray(series)).tolist())

    def finish(self, sigma: float = 1.5, eps: float = 0.002, min_count: float = 20.0
               ) -> ResidualAtlas:
        """Smooth the sums (Gaussian ``sigma`` px); pixels with a smoothed brain count of
        ``min_count`` or less take the global mean and spread of all normal brain pixels."""
        if float(self.count.sum()) <= 0:
            raise ValueError("no normal brain pixels to fit an atlas on")
        c = smooth(self.count.float(), sigma).double()
        mu = smooth(self.s1.float(), sigma).double() / c.clamp(min=1e-3)
        var = smooth(self.s2.float(), sigma).double() / c.clamp(min=1e-3) - mu * mu
        g_mu = self.s1.sum() / self.count.sum()
        g_sd = (self.s2.sum() / self.count.sum() - g_mu * g_mu).clamp(min=1e-12).sqrt()
        ok = c > min_count
        mu = torch.where(ok, mu, g_mu)
        sd = torch.where(ok, var.clamp(min=1e-12).sqrt(), g_sd)
        return ResidualAtlas(mu.float().numpy(), sd.float().numpy(), float(eps),
                             len(self.series), self.n_slices, float(sigma), self.height)


def normalise(raw: np.ndarray | torch.Tensor, mean: float, std: float) -> Any:
    return (raw - mean) / (std if std > 0 else 1.0)


def combine(s_g: Any, s_r: Any, lambda_: float) -> Any:
    """``(1 - lambda) * s_g + lambda * s_r`` (arrays, tensors or floats)."""
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lambda_}")
    return (1.0 - lambda_) * s_g + lambda_ * s_r


def aggregate(slice_scores: Sequence[float] | np.ndarray, how: str = "max", k: int = 3) -> float:
    """Series score from slice scores: the max, or the mean of the top ``k``."""
    a = np.asarray(slice_scores, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("cannot aggregate an empty list of slice scores")
    if how == "max":
        return float(a.max())
    if how in ("topk_mean", "top3_mean", "topk"):
        k = max(1, min(int(k), a.size))
        return float(np.sort(a)[-k:].mean())
    raise ValueError(f"unknown aggregate {how!r} (use 'max' or 'topk_mean')")


# ------------------------------------------------------------------------------------ torch helpers


def gaussian_kernel(sigma: float, device: torch.device | str = "cpu") -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B,S,S) or (B,1,S,S) maps; sigma <= 0 returns the input."""
    if sigma <= 0:
        return maps
    squeeze = maps.dim() == 3
    m = maps.unsqueeze(1) if squeeze else maps
    k = gaussian_kernel(sigma, m.device)
    r = k.numel() // 2
    m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return m[:, 0] if squeeze else m


def residual_map(x: torch.Tensor, recon: torch.Tensor, brain: torch.Tensor,
                 cfg: ScoringConfig) -> torch.Tensor:
    """Smoothed residual inside the brain mask: (B,S,S) float32, zero outside the brain."""
    x = x[:, 0] if x.dim() == 4 else x
    recon = recon[:, 0] if recon.dim() == 4 else recon
    err = (x - recon).abs() if cfg.residual == "abs" else (x - recon) ** 2
    m = brain.to(err.dtype)
    err = smooth(err * m, cfg.smooth_sigma)
    return err * m


def masked_stat(maps: torch.Tensor, brain: torch.Tensor, cfg: ScoringConfig) -> torch.Tensor:
    """Per-slice statistic of a (B,S,S) map over the brain mask -> (B,). The map may be signed
    (the atlas z-map): pixels outside the brain never enter the top-q mean."""
    b = maps.shape[0]
    flat = maps.reshape(b, -1)
    mask = brain.reshape(b, -1)
    n = mask.sum(1).clamp(min=1)
    if cfg.rec_stat == "mean":
        return (flat * mask).sum(1) / n
    if cfg.rec_stat == "topq":
        # mean of the top ceil-ish(q * n_brain) pixels of each slice (a slice without brain
        # scores 0)
        vals = torch.where(mask, flat, torch.full_like(flat, torch.finfo(flat.dtype).min / 4))
        kb = (cfg.rec_q * n.to(torch.float32)).round().clamp(min=1).to(torch.long)
        kmax = int(min(int(kb.max()), flat.shape[1]))
        kb = kb.clamp(max=kmax)
        top = vals.topk(kmax, dim=1).values.cumsum(1)
        out = top.gather(1, (kb - 1)[:, None])[:, 0] / kb.to(flat.dtype)
        return torch.where(mask.any(1), out, torch.zeros_like(out))
    raise ValueError(f"unknown rec_stat {cfg.rec_stat!r}")


def geo_error(logits: torch.Tensor, labels: torch.Tensor, n_views: int, how: str) -> torch.Tensor:
    """Transform-prediction error averaged over views.

    ``logits`` (V*B, C) ordered view-major (see ``pretext.all_transforms``), ``labels`` (V*B,).
    """
    if how == "ce":
        err = F.cross_entropy(logits.float(), labels, reduction="none")
    elif how == "one_minus_p":
        p = torch.softmax(logits.float(), 1).gather(1, labels[:, None])[:, 0]
        err = 1.0 - p
    else:
        raise ValueError(f"unknown geo_error {how!r}")
    return err.view(n_views, -1).mean(0)
