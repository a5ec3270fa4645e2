"""Shared pieces of the SR and secondary-capture writers.

Why a module of its own: the worker hands the same finding and algorithm description to both
writers, and both must agree on how a verdict is spelled in a worklist column, how UIDs are
derived (so a retried job re-creates the *same* objects and the PACS de-duplicates them) and
which source images a finding may reference.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import pydicom
from pydicom.uid import generate_uid

log = logging.getLogger(__name__)

#: Verdicts the detector can return, in the spelling the worker stores.
VERDICTS: tuple[str, ...] = ("abnormal", "normal", "not_assessable")

#: Root under which every UID of an output object is derived. pydicom's own root: the project
#: has no registered root of its own; a site that has one can pass ``prefix=`` to ``derive_uid``.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."

#: Longest value of a LO attribute (SeriesDescription).
LO_MAX = 64


class OutputError(ValueError):
    """An output object cannot be built from the given inputs; the message says which input."""


@dataclass(frozen=True)
class AlgorithmInfo:
    """Provenance written into every output, so a reader can tell which model made a claim."""

    name: str
    version: str
    weights_sha256: str
    manufacturer: str


@dataclass(frozen=True)
class TriageFinding:
    """What the detector concluded about one series (the worker's result row, DICOM-free)."""

    verdict: str  # "abnormal" | "normal" | "not_assessable"
    score: float | None  # None when not assessable
    threshold: float
    priority: str  # e.g. "urgent" | "high" | "routine" (from score bands)
    reason: str | None  # e.g. why not assessable
    # (SOP Instance UID of a source image, slice score), most suspicious first
    top_slices: list[tuple[str, float]] = field(default_factory=list)
    # 1-based frame number of each top slice in its multi-frame (enhanced CT) image, in the
    # order of top_slices; empty (or None entries) for single-frame images
    top_frames: list[int | None] = field(default_factory=list)


@dataclass(frozen=True)
class TopSlice:
    """One of the finding's top slices resolved to its source: the image header, the slice
    score and, for a multi-frame image, the frame (1-based)."""

    header: pydicom.Dataset
    score: float
    frame: int | None = None


def derive_uid(*parts: str, prefix: str = UID_PREFIX) -> str:
    """Deterministic UID from ``parts``: the same job always names its objects the same way.

    A worker that crashes after sending an SR and retries must not create a second SR in the
    PACS; deriving the UID from the job key (instead of drawing a random one) makes the retry
    overwrite (or be ignored as) the same instance.
    """
    if not parts:
        raise OutputError("derive_uid needs at least one part")
    return str(generate_uid(prefix=prefix, entropy_srcs=["triage-agent-output", *map(str, parts)]))


def verdict_label(verdict: str) -> str:
    """Upper-case verdict as shown in worklist columns ("NOT ASSESSABLE")."""
    return verdict.replace("_", " ").upper()


def format_score(score: float | None) -> str:
    """Score with two decimals, or "NA" when the series could not be assessed."""
    return "NA" if score is None else f"{score:.2f}"


def clip_lo(text: str) -> str:
    """Trim a text to the 64 characters a LO attribute (SeriesDescription) holds."""
    text = " ".join(text.split())
    if len(text) > LO_MAX:
        log.warning("series description trimmed to %d characters", LO_MAX)
    return text[:LO_MAX]


def is_suspicious(finding: TriageFinding, slice_score: float) -> bool:
    """A slice is called suspicious only in an abnormal series and at or above the threshold
    (the SR's "Suspicious slice", the heat map's "MOST SUSPICIOUS")."""
    return finding.verdict == "abnormal" and slice_score >= finding.threshold


def validate_finding(finding: TriageFinding) -> None:
    """Reject findings that would produce a self-contradictory report.

    A "normal" SR without a score, or a "not assessable" one with a score, would mislead a
    reader more than no SR at all; say which field is wrong instead.
    """
    if finding.verdict not in VERDICTS:
        raise OutputError(f"finding.verdict must be one of {VERDICTS}, got {finding.verdict!r}")
    if not isinstance(finding.threshold, int | float) or not math.isfinite(finding.threshold):
        raise OutputError(f"finding.threshold must be a finite number, got {finding.threshold!r}")
    if finding.score is not None and not math.isfinite(finding.score):
        raise OutputError(f"finding.score must be finite or None, got {finding.score!r}")
    if any(not math.isfinite(float(s)) for _, s in finding.top_slices):
        raise OutputError("finding.top_slices holds a non-finite slice score")
    if finding.verdict == "not_assessable":
        if finding.score is not None:
            raise OutputError("finding.score must be None when the verdict is not_assessable")
    elif finding.score is None:
        raise OutputError(f"finding.score is required for verdict {finding.verdict!r}")
    if not finding.priority:
        raise OutputError("finding.priority must be a non-empty band name")
    frames = list(finding.top_frames) or [None] * len(finding.top_slices)
    if len(frames) != len(finding.top_slices):
        raise OutputError(
            f"finding.top_frames has {len(frames)} entries for {len(finding.top_slices)} "
            "top slices; give one frame number (or None) per slice"
        )
    if any(f is not None and (not isinstance(f, int) or f < 1) for f in frames):
        raise OutputError("finding.top_frames holds a frame number below 1 or not an integer")
    refs = [(uid, f) for (uid, _), f in zip(finding.top_slices, frames, strict=True)]
    if len(set(refs)) != len(refs):
        raise OutputError("finding.top_slices lists the same image (and frame) twice")


def validate_algorithm(algorithm: AlgorithmInfo) -> None:
    """Provenance is mandatory: a report without a model version cannot be audited."""
    for name in ("name", "version", "weights_sha256", "manufacturer"):
        if not str(getattr(algorithm, name) or "").strip():
            raise OutputError(f"algorithm.{name} must not be empty")


def index_source(source: Sequence[pydicom.Dataset]) -> dict[str, pydicom.Dataset]:
    """Map SOP Instance UID -> header, checking that all headers are one series of one study.

    Outputs copy patient and study attributes from the source; mixing studies would file the
    report under the wrong patient, the worst thing an output writer can do.
    """
    if len(source) == 0:
        raise OutputError("source must contain at least one image header")
    studies = {str(getattr(ds, "StudyInstanceUID", "")) for ds in source}
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in source}
    if len(studies) != 1 or "" in studies:
        raise OutputError(f"source headers belong to {len(studies)} studies; pass one series")
    if len(series) != 1 or "" in series:
        raise OutputError(f"source headers belong to {len(series)} series; pass one series")
    by_uid: dict[str, pydicom.Dataset] = {}
    for ds in source:
        for kw in ("SOPInstanceUID", "SOPClassUID"):
            if kw not in ds:
                raise OutputError(f"a source header has no {kw}")
        by_uid[str(ds.SOPInstanceUID)] = ds
    return by_uid


def sorted_source(source: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Source headers in a stable order (by SOP Instance UID), so two builds from the same
    headers in a different arrival order produce byte-identical evidence sequences."""
    return sorted(source, key=lambda ds: str(ds.SOPInstanceUID))


def top_slice_headers(finding: TriageFinding, by_uid: dict[str, pydicom.Dataset]) -> list[TopSlice]:
    """Resolve the finding's top slices to source headers (and frames); an unknown UID or frame
    is an error because a reference to an image the PACS does not hold is a dangling link in
    the report."""
    frames = list(finding.top_frames) or [None] * len(finding.top_slices)
    out = []
    for (uid, slice_score), frame in zip(finding.top_slices, frames, strict=True):
        ds = by_uid.get(str(uid))
        if ds is None:
            raise OutputError(
                "finding.top_slices references an image that is not in the source series"
            )
        if frame is not None and frame > int(ds.get("NumberOfFrames") or 1):
            raise OutputError(
                f"finding.top_frames names frame {frame} of an image with "
                f"{int(ds.get('NumberOfFrames') or 1)} frame(s)"
            )
        out.append(TopSlice(ds, float(slice_score), frame))
    return out


def _position(ds: pydicom.Dataset, frame: int | None) -> object:
    """ImagePositionPatient of a single-frame image, or of ``frame`` of a multi-frame one (its
    Plane Position functional group)."""
    if frame is None:
        return ds.get("ImagePositionPatient")
    groups = ds.get("PerFrameFunctionalGroupsSequence")
    if groups is None or not 0 < frame <= len(groups):
        return None
    plane = groups[frame - 1].get("PlanePositionSequence")
    return plane[0].get("ImagePositionPatient") if plane else None


def slice_z(ds: pydicom.Dataset, frame: int | None = None) -> float | None:
    """Table position of a slice (or of ``frame`` of a multi-frame image): z (mm) of its
    ImagePositionPatient, None when absent."""
    pos = _position(ds, frame)
    if pos is None or len(pos) != 3:  # type: ignore[arg-type]
        return None
    try:
        z = float(pos[2])  # type: ignore[index]
    except (TypeError, ValueError):
        return None
    return z if math.isfinite(z) else None


def slice_label(ds: pydicom.Dataset, frame: int | None = None) -> str:
    """Where a slice lies, as the radiologist finds it in the CT: image number (frame number of
    a multi-frame image) and table position ("image 13, z 45.0 mm", "frame 13, z 45.0 mm")."""
    parts = []
    if frame is not None:
        parts.append(f"frame {frame}")
    elif ds.get("InstanceNumber") not in (None, ""):
        parts.append(f"image {ds.InstanceNumber}")
    z = slice_z(ds, frame)
    if z is not None:
        parts.append(f"z {z:.1f} mm")
    return ", ".join(parts) or "slice"


def anatomical_order(slices: Sequence[TopSlice]) -> list[int]:
    """Indices of ``slices`` from inferior to superior: by table position (z), then by image
    (frame) number where positions are missing or equal, then as given."""

    def key(i: int) -> tuple[float, float, int]:
        ts = slices[i]
        z = slice_z(ts.header, ts.frame)
        try:
            number = float(ts.frame if ts.frame is not None else ts.header.get("InstanceNumber"))
        except (TypeError, ValueError):
            number = math.inf
        return (math.inf if z is None else z, number, i)

    return sorted(range(len(slices)), key=key)


def split_datetime(when: datetime | None) -> tuple[str, str]:
    """DICOM DA and TM strings for ``when`` (now when None)."""
    when = when or datetime.now()
    return when.strftime("%Y%m%d"), when.strftime("%H%M%S")


def pin_times(ds: pydicom.Dataset, when: datetime | None) -> None:
    """Replace the creation timestamps highdicom stamps with ``when`` (when given).

    With all dates pinned, a rebuilt object is byte-identical to the first build, which makes a
    retried delivery a true duplicate rather than a conflicting version of the same UID.
    """
    if when is None:
        return
    day, time = split_datetime(when)
    ds.InstanceCreationDate = day
    ds.InstanceCreationTime = time
    if "DateOfSecondaryCapture" in ds:
        ds.DateOfSecondaryCapture = day
        ds.TimeOfSecondaryCapture = time
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")
