"""DICOM facts shared by the receiver, ingest and series completion: which SOP classes are the
images the node scores, what a valid UID looks like, and the image facts that the selection
rules read, wherever a classic or an enhanced (multi-frame) CT image keeps them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)

# Images the node scores; other accepted SOP classes (storage.extra_sop_classes) are stored and
# ignored. The enhanced ones hold a whole series' slices as frames of one instance.
IMAGE_SOP_CLASSES = (str(CTImageStorage), str(EnhancedCTImageStorage),
                     str(LegacyConvertedEnhancedCTImageStorage))

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def valid_uid(value: Any) -> bool:
    """A UID as PS3.5 9.1 defines it: dot-separated numbers without leading zeros, <= 64 chars."""
    return isinstance(value, str) and len(value) <= 64 and bool(UID_RE.fullmatch(value))


@dataclass(frozen=True)
class ImageFacts:
    """What selection needs of one image instance (classic or multi-frame)."""

    frames: int  # NumberOfFrames, 1 for a classic image
    slice_thickness_mm: float | None
    orientation: Any  # ImageOrientationPatient (6 numbers) or None
    kernel: str | None  # ConvolutionKernel, values joined by "\"
    #: BodyPartExamined, else (enhanced images) the Frame Anatomy group's anatomic region in
    #: upper case ("HEAD")
    body_part: str | None = None


def functional_group(ds: Any, sequence: str, frame: int | None = None) -> Any:
    """The item of ``sequence`` (e.g. "PlaneOrientationSequence") of a multi-frame image: from
    the frame's per-frame group when ``frame`` (0-based) is given and it has one, else from the
    shared group; None when neither has it."""
    per_frame = _items(ds.get("PerFrameFunctionalGroupsSequence"))
    shared = _items(ds.get("SharedFunctionalGroupsSequence"))
    groups = []
    if frame is not None and 0 <= frame < len(per_frame):
        groups.append(per_frame[frame])
    groups += shared[:1]
    if frame is None:
        groups += per_frame[:1]
    for g in groups:
        items = _items(g.get(sequence))
        if items:
            return items[0]
    return None


def _items(value: Any) -> list[Any]:
    """The items of a sequence element's value; [] for anything else (a malformed header)."""
    return list(value) if isinstance(value, Sequence) else []


def _float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def image_facts(ds: Any) -> ImageFacts:
    """Frames, slice thickness, orientation and kernel from the top level of a classic image or
    from the functional groups of an enhanced one (never raises on odd values)."""
    try:
        frames = max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        frames = 1
    thickness = _float(ds.get("SliceThickness"))
    iop = ds.get("ImageOrientationPatient")
    kernel = ds.get("ConvolutionKernel")
    body_part = ds.get("BodyPartExamined") or None
    if "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds:
        if thickness is None:
            pm = functional_group(ds, "PixelMeasuresSequence")
            thickness = _float(pm.get("SliceThickness")) if pm is not None else None
        if iop is None:
            po = functional_group(ds, "PlaneOrientationSequence")
            iop = po.get("ImageOrientationPatient") if po is not None else None
        anatomy = functional_group(ds, "FrameAnatomySequence")
        region = _items(anatomy.get("AnatomicRegionSequence")) if anatomy is not None else []
        if body_part is None and region:
            body_part = str(region[0].get("CodeMeaning", "") or "").upper() or None
        for seq in ("CTReconstructionSequence", "UnassignedSharedConvertedAttributesSequence"):
            if kernel in (None, ""):  # enhanced CT, or converted from classic images
                item = functional_group(ds, seq)
                kernel = item.get("ConvolutionKernel") if item is not None else None
    if kernel in (None, ""):
        kernel_text = None
    elif isinstance(kernel, str):
        kernel_text = kernel[:64]
    else:
        kernel_text = "\\".join(str(k) for k in kernel)[:64]
    return ImageFacts(frames, thickness, iop if iop not in (None, "") else None, kernel_text,
                      None if body_part is None else str(body_part)[:64])
