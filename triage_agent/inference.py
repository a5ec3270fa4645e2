"""Series-level inference: DICOM files -> preprocessing -> detector -> verdict.

``score_series`` is what the queue worker and ``triage-agent score`` call. It never raises for a
series it cannot read: it returns verdict ``not_assessable`` with the reason.

Runtime only: the training and evaluation datasets live in ``triage_agent.datasets``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from triage_model.checkpoint import Detector
from triage_model.scoring import aggregate as aggregate_scores

from triage_agent.operating_point import verdict_for

log = logging.getLogger(__name__)


@dataclass
class SeriesResult:
    series_instance_uid: str | None
    score: float | None
    verdict: str  # "abnormal" | "normal" | "not_assessable"
    threshold: float
    reason: str | None
    slices: list[tuple[str | None, float]]  # (sop_instance_uid, score) per kept slice
    heatmaps: np.ndarray | None  # (N,S,S) float32
    model_input: Any = None  # triage_agent.preprocess.ModelInput
    timings: dict[str, float] = field(default_factory=dict)
    s_g: list[float] = field(default_factory=list)
    s_r: list[float] = field(default_factory=list)
    #: 1-based frame number of each slice in ``slices`` when the series is one multi-frame
    #: (enhanced CT) instance; empty for single-frame images
    frames: list[int | None] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "series_instance_uid": self.series_instance_uid,
            "score": self.score,
            "verdict": self.verdict,
            "threshold": self.threshold,
            "reason": self.reason,
            "slices": [{"sop_instance_uid": u, "score": s}
                       | ({"frame": self.frames[i]} if i < len(self.frames) else {})
                       for i, (u, s) in enumerate(self.slices)],
        }


def _not_assessable(uid: str | None, threshold: float, reason: str, mi: Any = None,
                    timings: dict[str, float] | None = None) -> SeriesResult:
    return SeriesResult(uid, None, "not_assessable", threshold, reason, [], None, mi, timings or {})


def score_model_input(
    mi: Any,
    detector: Detector,
    *,
    sop_instance_uids: Sequence[str | None] | None = None,
    frame_numbers: Sequence[int | None] | None = None,
    series_instance_uid: str | None = None,
    lambda_: float = 0.5,
    threshold: float | None = None,
    aggregate: str = "max",
    top_k: int = 3,
    min_brain_slices: int = 5,
    batch_size: int = 32,
) -> SeriesResult:
    """Score an already preprocessed series (``ModelInput``)."""
    thr = float(detector.threshold_for(aggregate) if threshold is None else threshold)
    n = int(mi.x.shape[0])
    if n < min_brain_slices:
        return _not_assessable(series_instance_uid, thr,
                               f"only {n} slice(s) with enough brain (need {min_brain_slices})", mi)
    t0 = time.perf_counter()
    ss = detector.score(mi.x, mi.brain, lambda_=lambda_, batch_size=batch_size,
                        hu=getattr(mi, "hu", None))
    t_model = time.perf_counter() - t0
    score = aggregate_scores(ss.score, aggregate, top_k)
    uids = list(sop_instance_uids) if sop_instance_uids is not None else []
    slices = []
    for i, z in enumerate(np.asarray(mi.slice_index).tolist()):
        uid = uids[z] if 0 <= z < len(uids) else None
        slices.append((uid, float(ss.score[i])))
    frames = [] if frame_numbers is None else [
        frame_numbers[z] if 0 <= z < len(frame_numbers) else None
        for z in np.asarray(mi.slice_index).tolist()]
    return SeriesResult(
        frames=frames,
        series_instance_uid=series_instance_uid,
        score=float(score),
        verdict=verdict_for(float(score), thr),
        threshold=thr,
        reason=None,
        slices=slices,
        heatmaps=ss.heatmap,
        model_input=mi,
        timings={"model_s": t_model},
        s_g=[float(v) for v in ss.s_g],
        s_r=[float(v) for v in ss.s_r],
    )


class ModelGate:
    """Lets ``slots`` series at a time through the detector, the others waiting in arrival order.

    The scoring workers read, preprocess and publish side by side, but on a CPU the detector
    itself runs one series at a time with all the cores' threads: two series scored side by
    side, each with every core's threads, spend about 13% more CPU for the same slices than one
    after the other (oversubscribed cores), and a series alone still gets every core. While one
    series is scored the next is read and preprocessed by another worker, ready when the
    detector is free.
    """

    def __init__(self, slots: int = 1) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots = slots
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0  # tickets below this may enter
        self._inside = 0

    def __enter__(self) -> ModelGate:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: ticket == self._serving and self._inside < self.slots)
            self._serving += 1
            self._inside += 1
            self._cond.notify_all()  # the next ticket may fit in a free slot too
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._inside -= 1
            self._cond.notify_all()


_gates_lock = threading.Lock()


def model_gate(detector: Detector, slots: int | None = None) -> ModelGate:
    """The detector's gate (made on first use, with ``slots`` or 1); ``slots`` resizes it."""
    with _gates_lock:
        gate: ModelGate | None = getattr(detector, "_node_gate", None)
        if gate is None:
            gate = ModelGate(slots or 1)
            detector._node_gate = gate  # type: ignore[attr-defined]
        elif slots is not None and slots != gate.slots:
            with gate._cond:
                gate.slots = slots
                gate._cond.notify_all()
        return gate


class MemoryBudget:
    """Bounds the memory of the series being read and preprocessed at the same time: a series
    waits until its estimate fits beside the others' (one alone always proceeds). Reading is
    mostly pure Python, so two series read side by side gain little time, while each
    full-resolution volume and its resampled copies take a few hundred MB for a thin series."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._cond = threading.Condition()
        self._used = 0

    @contextlib.contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._used == 0
                                or self._used + nbytes <= self.limit_bytes)
            self._used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self._used -= nbytes
                self._cond.notify_all()


#: series read and preprocessed at the same time hold at most this much (estimated)
PREPARE_BUDGET = MemoryBudget(1 << 30)
#: estimated peak bytes of reading and preprocessing per byte of stored DICOM (16-bit pixels
#: become 32-bit floats, and the resampling holds about three copies)
PREPARE_BYTES_PER_FILE_BYTE = 6


def prepare_estimate(paths: Sequence[Path]) -> int:
    """Estimated peak bytes of reading and preprocessing these files."""
    total = 0
    for p in paths:
        with contextlib.suppress(OSError):
            total += Path(p).stat().st_size
    return PREPARE_BYTES_PER_FILE_BYTE * total


_warm_lock = threading.Lock()


def warm_up(detector: Detector, batch_size: int = 8) -> float:
    """Build the detector's runtime and run it once on a blank batch, so that the first series
    does not wait for it (the fast path exports its network to ONNX Runtime and plans memory for
    a full batch on its first call: seconds on a small CPU). Several workers share one detector:
    the first call does the work, the others wait for it. Returns the seconds spent here."""
    import torch
    from triage_model.runtime import FAST_BATCH

    t0 = time.perf_counter()
    with _warm_lock:
        if getattr(detector, "_node_warm", False):
            return time.perf_counter() - t0
        n = max(1, min(FAST_BATCH, batch_size))
        x = torch.zeros(n, 1, detector.input_size, detector.input_size, device=detector.device)
        with torch.inference_mode():
            detector.reconstruct(x)
        detector._node_warm = True  # type: ignore[attr-defined]
    return time.perf_counter() - t0


def score_series(
    paths: Sequence[Path],
    detector: Detector,
    *,
    lambda_: float = 0.5,
    threshold: float | None = None,
    aggregate: str = "max",
    top_k: int = 3,
    min_brain_slices: int = 5,
    batch_size: int = 32,
) -> SeriesResult:
    """Read one DICOM series, preprocess it and score it.

    ``threshold=None`` uses the threshold calibrated into the checkpoint for ``aggregate``.
    """
    from triage_agent.preprocess import PreprocessError, model_inputs, read_series

    thr = float(detector.threshold_for(aggregate) if threshold is None else threshold)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with PREPARE_BUDGET.hold(prepare_estimate(paths)):
        t_read = time.perf_counter()
        timings["prepare_wait_s"] = t_read - t0
        try:
            vol = read_series([Path(p) for p in paths])
        except PreprocessError as e:
            return _not_assessable(None, thr, f"cannot read series: {e}", timings=timings)
        t1 = time.perf_counter()
        timings["read_s"] = t1 - t_read
        try:
            mi = model_inputs(vol, size=detector.input_size)
        except PreprocessError as e:
            return _not_assessable(vol.series_instance_uid, thr, f"preprocessing failed: {e}",
                                   timings=timings)
        t2 = time.perf_counter()
        timings["preprocess_s"] = t2 - t1
        uids, frames = vol.sop_instance_uids, vol.frame_numbers
        series_uid = vol.series_instance_uid
        del vol  # the full-resolution volume (hundreds of MB for a thin series) is not needed now
    with model_gate(detector):
        timings["model_wait_s"] = time.perf_counter() - t2
        res = score_model_input(
            mi, detector, sop_instance_uids=uids, frame_numbers=frames,
            series_instance_uid=series_uid, lambda_=lambda_, threshold=thr, aggregate=aggregate,
            top_k=top_k, min_brain_slices=min_brain_slices, batch_size=batch_size,
        )
    res.timings = {**timings, **res.timings, "total_s": time.perf_counter() - t0}
    return res


# ----------------------------------------------------------------------------- finding series


def find_series(paths: Iterable[Path | str]) -> dict[str, list[Path]]:
    """Files (recursively under folders) grouped by SeriesInstanceUID; non-DICOM files skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list[Path]] = defaultdict(list)
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        uid = getattr(ds, "SeriesInstanceUID", None)
        if uid:
            groups[str(uid)].append(f)
    return dict(groups)
