"""Self-describing checkpoints and the ``Detector`` that the node runs.

The ``Detector`` scores the method families the node ships (``SHIPPED_METHODS``): the denoising
U-Net (``dae``: one network or an ensemble, the reconstruction residual, optionally the residual
atlas) and the multitask VAE + geometric head (``multitask``: both terms). The research baselines
that training and evaluation compare against score through ``triage_model.baselines``.

A checkpoint is a ``torch.save``d dict of tensors and plain values (loadable with
``weights_only=True``): format tag, method, network config, state dict, scoring config,
normalisation statistics measured on normal validation slices, calibrated operating thresholds,
the 5 %-voxel-FPR pixel threshold, a training-data summary and the code version. The weights hash
is the SHA-256 of the file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from triage_model import pretext
from triage_model.network import NetConfig, build_network
from triage_model.options import ALL_METHODS
from triage_model.runtime import (
    LEAN_PASSES,
    RUNTIMES,
    Reconstruct,
    fast_reconstruction,
    reference_reconstruction,
)
from triage_model.scoring import (
    NormStats,
    ResidualAtlas,
    ScoringConfig,
    apply_slice_context,
    atlas_heights,
    combine,
    geo_error,
    masked_stat,
    residual_map,
)
from triage_model.symmetry import asymmetric_residual, fit_midline

log = logging.getLogger(__name__)

FORMAT = "triage-detector/1"
MODEL_VERSION = "0.1.0"
DEFAULT_WEIGHTS_NAME = "detector.pt"

#: The method families the node runs, with the score terms each uses ("geo": the geometric
#: head's s_g, "rec": the reconstruction's s_r).
SHIPPED_METHODS: dict[str, dict[str, bool]] = {
    "dae": {"geo": False, "rec": True},
    "multitask": {"geo": True, "rec": True},
}
DISPLAY_NAMES = {
    "dae": "Denoising U-Net, coarse noise (Kascenas 2022)",
    "multitask": "Multitask VAE + geometric head (seed)",
}


class CheckpointError(RuntimeError):
    """The checkpoint file is missing, unreadable or not a detector checkpoint."""


def default_weights_path() -> Path:
    return Path(__file__).resolve().parent / "weights" / DEFAULT_WEIGHTS_NAME


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


@dataclass
class SliceScores:
    score: np.ndarray  # (N,) combined, normalised slice score
    s_g: np.ndarray  # (N,) normalised geometric score (0 where the method has none)
    s_r: np.ndarray  # (N,) normalised reconstruction score (0 where the method has none)
    heatmap: np.ndarray  # (N,S,S) float32: smoothed residual inside the brain mask


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Detector:
    """A loaded detector: ``score(x, brain)`` -> per-slice scores and heat maps.

    Scores a network's reconstruction residual (``rec``) and/or its geometric head's error
    (``geo``), as ``TERMS`` says for the checkpoint's method; subclasses in
    ``triage_model.baselines`` widen ``TERMS`` to the research baselines."""

    #: method -> the score terms it uses; a checkpoint of another method is refused
    TERMS: ClassVar[dict[str, dict[str, bool]]] = SHIPPED_METHODS
    #: whether ``score(..., hu=)`` (the slices in HU) is read; the shipped methods read only the
    #: brain window
    READS_HU: ClassVar[bool] = False

    def __init__(self, ckpt: dict[str, Any], device: str | torch.device = "auto",
                 weights_sha256: str = "", runtime: str = "reference") -> None:
        """``runtime``: ``"reference"``, ``"fast"`` (``triage_model.runtime``: the same scores
        to float rounding, in less time; built on the first call that scores) or ``"lean"``
        (fewer network passes on an ensemble: other scores, measured in docs/experiments.md)."""
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if ckpt.get("format") != FORMAT:
            raise CheckpointError(f"not a detector checkpoint (format {ckpt.get('format')!r})")
        self.ckpt = ckpt
        self.method: str = ckpt["method"]
        if self.method not in self.TERMS:
            raise CheckpointError(self._unsupported(self.method))
        self.uses = self.TERMS[self.method]
        self.name: str = ckpt.get("name") or f"ssl-ood-{self.method}"
        self.version: str = str(ckpt.get("version", MODEL_VERSION))
        self.weights_sha256 = weights_sha256
        self.scoring = ScoringConfig.from_dict(ckpt.get("scoring"))
        self.norm = NormStats.from_dict(ckpt.get("norm"))
        self.symmetry, self.atlas = self._residual_options(ckpt)
        self.thresholds: dict[str, float] = {k: float(v) for k, v in
                                             (ckpt.get("thresholds") or {}).items()}
        self.threshold: float = float(self.thresholds.get("max", ckpt.get("threshold", 3.0)))
        self.pixel_threshold: float | None = ckpt.get("pixel_threshold")
        self.input_size: int = int(ckpt.get("input_size", 128))
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.net = self._network(ckpt)
        self.runtime = runtime
        #: the engine the reconstruction runs on ("torch", or "onnxruntime" on the fast path),
        #: known once the first batch is scored
        self.engine: str | None = None
        self._reconstruct: Reconstruct | None = None
        self._build_lock = threading.Lock()  # several scoring workers share one detector

    @staticmethod
    def _unsupported(method: str) -> str:
        if method in ALL_METHODS:
            return (f"method {method!r} is a research baseline, not a detector the node runs; "
                    "`triage-agent evaluate --model` scores it")
        return f"unknown method {method!r} in checkpoint"

    def _residual_options(self, ckpt: dict[str, Any]) -> tuple[bool, ResidualAtlas | None]:
        """(asymmetric residual on?, residual atlas) of the reconstruction term: s_r gets the
        asymmetric residual's column with ``ScoringConfig.symmetry``, and is taken of the atlas
        z-map with ``ScoringConfig.atlas_bins``."""
        if not self.uses["rec"]:
            return False, None
        if not self.scoring.atlas_bins:
            return self.scoring.symmetry, None
        if not ckpt.get("atlas"):
            raise CheckpointError("the checkpoint's scoring uses a residual atlas "
                                  f"(atlas_bins={self.scoring.atlas_bins}) but holds none; "
                                  "fit one with `python -m triage_model.atlas`")
        try:
            return self.scoring.symmetry, ResidualAtlas.from_dict(ckpt["atlas"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"unreadable residual atlas in checkpoint: {e}") from e

    def _network(self, ckpt: dict[str, Any]) -> torch.nn.Module | None:
        """The checkpoint's network with its weights, on ``self.device`` in eval mode."""
        cfg = NetConfig.from_dict(ckpt["net_config"])
        self.input_size = cfg.input_size
        net = build_network(cfg)
        try:
            net.load_state_dict(ckpt["state_dict"])
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(f"checkpoint weights do not fit the network: {e}") from e
        return net.to(self.device).eval()

    def __repr__(self) -> str:
        return (f"Detector({self.name} v{self.version}, method={self.method}, "
                f"threshold={self.threshold:.3f}, sha256={self.weights_sha256[:12]})")

    def reconstruct(self, x1: torch.Tensor) -> torch.Tensor:
        """The reconstruction scoring uses, of (B,1,S,S) slices: the network's output, or with
        ``ScoringConfig.flip_tta`` its mean with the mirrored slices' output, mirrored back."""
        if self._reconstruct is None:
            with self._build_lock:
                if self._reconstruct is None:
                    self._reconstruct, self.engine = self._build_runtime()
        return self._reconstruct(x1)

    def _build_runtime(self) -> tuple[Reconstruct, str]:
        assert self.net is not None
        if self.runtime in ("fast", "lean"):
            return fast_reconstruction(self.net, self.scoring.flip_tta, self.device,
                                       plan=LEAN_PASSES if self.runtime == "lean" else None)
        return reference_reconstruction(self.net, self.scoring.flip_tta), "torch"

    def threshold_for(self, aggregate: str = "max") -> float:
        return float(self.thresholds.get(aggregate, self.threshold))

    # ------------------------------------------------------------------------------ raw scores

    @torch.inference_mode()
    def raw_scores(self, x: np.ndarray, brain: np.ndarray, batch_size: int = 32,
                   hu: np.ndarray | None = None, heights: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Un-normalised (s_g, s_r, heatmap) for (N,S,S) inputs (``hu``: see ``READS_HU``).

        With ``ScoringConfig.symmetry`` s_r is (N,2): the residual's statistic and that of its
        asymmetric part (``NormStats.apply`` takes the larger z). With a residual atlas each
        slice's height in its series is needed: ``heights`` (N,), or, when omitted, x is taken
        to be one series in slice order (``atlas_heights`` of the atlas's kind)."""
        x = np.asarray(x, dtype=np.float32)
        brain = np.asarray(brain, dtype=bool)
        if x.ndim != 3 or x.shape != brain.shape:
            raise ValueError(f"x and brain must both be (N,S,S); got {x.shape} and {brain.shape}")
        n = x.shape[0]
        if self.atlas is not None:
            heights = (atlas_heights(self.atlas.height, brain) if heights is None
                       else np.asarray(heights, np.float32))
            if heights.shape != (n,):
                raise ValueError(f"heights must be ({n},), got {heights.shape}")
        if n and x.shape[1:] != (self.input_size, self.input_size):
            raise ValueError(f"this detector expects {self.input_size}x{self.input_size} slices, "
                             f"got {x.shape[1]}x{x.shape[2]}")
        g_all = np.zeros(n, np.float32)
        r_all = np.zeros((n, 2) if self.symmetry else n, np.float32)
        heat = np.zeros(x.shape, np.float32)
        for s in range(0, n, batch_size):
            xb = torch.from_numpy(x[s:s + batch_size]).to(self.device)
            mb = torch.from_numpy(brain[s:s + batch_size]).to(self.device)
            hb = None
            if hu is not None and self.READS_HU:
                hb = torch.from_numpy(np.asarray(hu[s:s + batch_size], np.float32)).to(self.device)
            hts = None if heights is None else heights[s:s + batch_size]
            g, r, h = self._batch(xb, mb, hb, hts)
            g_all[s:s + len(xb)] = g.float().cpu().numpy()
            r_all[s:s + len(xb)] = r.float().cpu().numpy()
            heat[s:s + len(xb)] = h.float().cpu().numpy()
        return g_all, r_all, heat

    def rec_stat(self, x1: torch.Tensor, recon: torch.Tensor, mb: torch.Tensor,
                 heights: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(statistic (B,), heat map (B,S,S)) of a reconstruction: the smoothed residual and its
        top-q statistic, taken of the atlas z-map when the checkpoint has an atlas."""
        heat = residual_map(x1, recon, mb, self.scoring)
        if self.atlas is None:
            return masked_stat(heat, mb, self.scoring), heat
        if heights is None:
            raise ValueError("this detector's residual atlas needs each slice's height")
        return masked_stat(self.atlas.zmap(heat, heights), mb, self.scoring), heat

    def _batch(self, xb: torch.Tensor, mb: torch.Tensor, hb: torch.Tensor | None = None,
               heights: np.ndarray | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw (s_g, s_r, heat map) of one batch; ``hb`` (the batch in HU) as ``READS_HU``."""
        zeros = xb.new_zeros(xb.shape[0])
        assert self.net is not None
        x1 = xb.unsqueeze(1)
        if self.uses["rec"]:
            recon = self.reconstruct(x1)
            r, heat = self.rec_stat(x1, recon, mb, heights)
            if self.symmetry:
                asym = asymmetric_residual(heat, mb, fit_midline(xb))
                r = torch.stack([r, masked_stat(asym, mb, self.scoring)], 1)
        else:
            heat, r = torch.zeros_like(xb), zeros
        g = zeros
        if self.uses["geo"]:
            views, labels = pretext.all_transforms(x1)
            logits = self.net(views, sample=False, decode=False).geo_logits
            assert logits is not None
            g = geo_error(logits, labels.to(logits.device), pretext.N_TRANSFORMS,
                          self.scoring.geo_error)
        return g, r, heat

    # ------------------------------------------------------------------------------ public API

    def normalise(self, g_raw: np.ndarray, r_raw: np.ndarray, lambda_: float,
                  area: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """z-scores of the raw terms and their combination; ``area`` = brain fraction per slice."""
        zg, zr = self.norm.apply(g_raw, r_raw, area)
        s_g = zg if self.uses["geo"] else np.zeros_like(zg)
        s_r = zr if self.uses["rec"] else np.zeros_like(zr)
        if self.uses["geo"] and self.uses["rec"]:
            score = combine(s_g, s_r, lambda_)
        else:
            score = s_g if self.uses["geo"] else s_r
        return np.asarray(score, np.float32), s_g, s_r

    def score(self, x: np.ndarray, brain: np.ndarray, lambda_: float = 0.5,
              batch_size: int = 32, *, hu: np.ndarray | None = None) -> SliceScores:
        """Score (N,S,S) brain-window slices in [0,1] with their brain masks.

        Methods with a single term ignore ``lambda_`` (score = that term). ``hu`` (N,S,S), the
        slices in Hounsfield units, is read only by detectors with ``READS_HU``. With
        ``ScoringConfig.slice_context`` or a residual atlas the slices must be one series in
        slice order.
        """
        if not 0.0 <= lambda_ <= 1.0:
            raise ValueError(f"lambda must be in [0, 1], got {lambda_}")
        g_raw, r_raw, heat = self.raw_scores(x, brain, batch_size, hu=hu)
        if self.scoring.slice_context:  # x is one series in slice order
            g_raw = apply_slice_context(g_raw, self.scoring.slice_context)
            r_raw = apply_slice_context(r_raw, self.scoring.slice_context)
        area = np.asarray(brain, bool).reshape(len(g_raw), -1).mean(1) if len(g_raw) else None
        score, s_g, s_r = self.normalise(g_raw, r_raw, lambda_, area)
        return SliceScores(score=score, s_g=s_g, s_r=s_r, heatmap=heat)


# ---------------------------------------------------------------------------------- save / load


def make_checkpoint(
    method: str,
    *,
    net: torch.nn.Module | None = None,
    scoring: ScoringConfig | None = None,
    norm: NormStats | None = None,
    thresholds: dict[str, float] | None = None,
    pixel_threshold: float | None = None,
    input_size: int = 128,
    hu: dict[str, float] | None = None,
    training: dict[str, Any] | None = None,
    name: str | None = None,
    display_name: str | None = None,
) -> dict[str, Any]:
    """A checkpoint dict of ``method`` (any method training writes, ``ALL_METHODS``);
    uncalibrated unless ``norm`` and ``thresholds`` are given. ``display_name`` defaults to the
    shipped method's; the research baselines' are in ``triage_model.baselines.DISPLAY_NAMES``."""
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(ALL_METHODS)}")
    net_cfg: NetConfig | None = net.cfg if net is not None else None  # type: ignore[assignment]
    ck: dict[str, Any] = {
        "format": FORMAT,
        "name": name or f"ssl-ood-{method}",
        "method": method,
        "display_name": display_name or DISPLAY_NAMES.get(method),  # None: the method's own
        "version": MODEL_VERSION,
        "input_size": int(net_cfg.input_size if net_cfg is not None else input_size),
        "scoring": (scoring or ScoringConfig()).to_dict(),
        "norm": (norm or NormStats()).to_dict(),
        "thresholds": {k: float(v) for k, v in (thresholds or {}).items()},
        "pixel_threshold": None if pixel_threshold is None else float(pixel_threshold),
        "hu": dict(hu or {}),
        "training": training or {},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if net is not None and net_cfg is not None:
        ck["net_config"] = net_cfg.to_dict()
        ck["state_dict"] = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return ck


def save_checkpoint(ckpt: dict[str, Any], path: Path | str) -> str:
    """Atomically write a checkpoint; returns its SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    data = buf.getvalue()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return sha256_bytes(data)


def read_checkpoint(path: Path | str) -> tuple[dict[str, Any], str]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"detector weights not found: {path}")
    data = path.read_bytes()
    try:
        ck = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"cannot read detector weights {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a detector checkpoint (expected format {FORMAT})")
    return ck, sha256_bytes(data)


def load_detector(path: Path | str | None = None, device: str = "auto",
                  runtime: str = "fast") -> Detector:
    """Load a detector checkpoint (default: the bundled weights); clear error if missing, corrupt
    or of a method the node does not run (``triage_model.baselines.load_any_detector`` loads
    those for evaluation). ``runtime``: see ``Detector``."""
    p = Path(path) if path is not None else default_weights_path()
    ck, digest = read_checkpoint(p)
    det = Detector(ck, device=device, weights_sha256=digest, runtime=runtime)
    log.info("loaded %r from %s", det, p)
    return det
