"""Most suspicious slices -> RGB secondary-capture series with the heat map burned in.

Why a secondary capture: every PACS viewer shows an SC image, so the radiologist sees *where*
the detector looked without a special viewer or plug-in. The overlay, the verdict and the
"not for diagnosis" banner are burned into the pixels (BurnedInAnnotation YES) because
overlays and presentation states are dropped by too many archives and routers.

Rendering: the brain-window slice is upscaled to ``out_size``; the heat map, normalised by a
fixed display maximum (``heat_max``) or by the maximum over the series, is coloured with a
perceptually uniform matplotlib colormap and blended at ``opacity`` only where it exceeds
``heat_floor`` of that maximum, so normal brain stays grey. A dark banner above the image
(not over it: no anatomy is hidden) carries "AI TRIAGE - NOT FOR DIAGNOSIS" and the verdict,
score, threshold and slice score. Text is drawn with Pillow (a dependency of matplotlib) in
the DejaVu Sans font that matplotlib bundles, so the look does not depend on system fonts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage as ndi

from triage_agent.outputs.common import (
    AlgorithmInfo,
    OutputError,
    TriageFinding,
    clip_lo,
    derive_uid,
    format_score,
    index_source,
    pin_times,
    split_datetime,
    top_slice_headers,
    validate_algorithm,
    validate_finding,
    verdict_label,
)

if TYPE_CHECKING:  # pragma: no cover
    from PIL import ImageFont

log = logging.getLogger(__name__)

BANNER_TEXT = "AI TRIAGE - NOT FOR DIAGNOSIS"
#: Banner colours (RGB): near-black background, amber warning line, white details.
BANNER_BG = (16, 16, 16)
BANNER_WARN = (255, 196, 0)
BANNER_INFO = (235, 235, 235)
#: DCM 121322 "Source image for image processing operation" (CID 7202).
PURPOSE_SOURCE = CodedConcept("121322", "DCM", "Source image for image processing operation")
#: DCM 109102 "Processing Equipment" (CID 7005): the detector, as contributing equipment.
PURPOSE_PROCESSING = CodedConcept("109102", "DCM", "Processing Equipment")


# ------------------------------------------------------------------------------ rendering


@lru_cache(maxsize=8)
def _font(size_px: int, bold: bool) -> ImageFont.FreeTypeFont:
    """DejaVu Sans from matplotlib's own font directory (always present with matplotlib)."""
    from matplotlib import font_manager
    from PIL import ImageFont

    path = font_manager.findfont(
        font_manager.FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal"),
        fallback_to_default=True,
    )
    return ImageFont.truetype(path, size_px)


def banner_height(out_size: int) -> int:
    """Rows of the banner for an image ``out_size`` wide (two lines of text)."""
    return max(28, int(round(out_size * 0.11)))


def _draw_banner(width: int, lines: Sequence[str]) -> np.ndarray:
    """(banner_height, width, 3) uint8 banner with the warning line and a detail line."""
    from PIL import Image, ImageDraw

    h = banner_height(width)
    img = Image.new("RGB", (width, h), BANNER_BG)
    draw = ImageDraw.Draw(img)
    pad = max(2, h // 10)
    sizes = (max(9, int(h * 0.38)), max(8, int(h * 0.30)))
    colours = (BANNER_WARN, BANNER_INFO)
    y = pad
    for i, text in enumerate(lines[:2]):
        size = sizes[i]
        font = _font(size, bold=i == 0)
        # shrink until the line fits the width (long site-specific texts)
        while size > 6 and draw.textlength(text, font=font) > width - 2 * pad:
            size -= 1
            font = _font(size, bold=i == 0)
        draw.text((pad, y), text, fill=colours[i], font=font)
        y += int(sizes[0] * 1.25)
    return np.asarray(img, dtype=np.uint8)


def _upscale(a: np.ndarray, out_size: int) -> np.ndarray:
    """Bilinear resize of a square (S, S) array to (out_size, out_size), pixel centres aligned."""
    if a.shape[0] == out_size and a.shape[1] == out_size:
        return a.astype(np.float32)
    zoom = (out_size / a.shape[0], out_size / a.shape[1])
    return ndi.zoom(a.astype(np.float32), zoom, order=1, mode="nearest", grid_mode=True)


def render_overlay(
    image: np.ndarray,
    heatmap: np.ndarray,
    *,
    heat_max: float,
    lines: Sequence[str] = (BANNER_TEXT,),
    opacity: float = 0.45,
    colormap: str = "inferno",
    out_size: int = 512,
    heat_floor: float = 0.2,
) -> np.ndarray:
    """One slice -> (banner + out_size, out_size, 3) uint8 RGB picture.

    ``heat_floor`` is a fraction of ``heat_max``: below it the pixel stays grey, and the colour
    fades in between ``heat_floor`` and twice that, so the overlay has soft edges instead of a
    hard contour that could be mistaken for a segmentation.
    """
    import matplotlib

    if image.ndim != 2 or image.shape != heatmap.shape or image.shape[0] != image.shape[1]:
        raise OutputError(
            f"image and heat map must be the same square (S, S) shape, got {image.shape} "
            f"and {heatmap.shape}"
        )
    if not (0.0 <= opacity <= 1.0):
        raise OutputError(f"opacity must be within 0..1, got {opacity}")
    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError as e:
        raise OutputError(f"unknown matplotlib colormap {colormap!r}") from e

    grey = np.clip(_upscale(np.nan_to_num(image), out_size), 0.0, 1.0)  # (O, O)
    heat = np.maximum(_upscale(np.nan_to_num(heatmap), out_size), 0.0)
    hn = np.clip(heat / heat_max, 0.0, 1.0) if heat_max > 0 else np.zeros_like(heat)
    ramp = max(heat_floor, 1e-3)
    alpha = opacity * np.clip((hn - heat_floor) / ramp, 0.0, 1.0)  # 0 below the floor
    colour = cmap(hn)[..., :3].astype(np.float32)  # (O, O, 3)
    rgb = grey[..., None] * (1.0 - alpha[..., None]) + colour * alpha[..., None]
    body = np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.concatenate([_draw_banner(out_size, lines), body], axis=0)


# ------------------------------------------------------------------------------ DICOM


def _fill_template(template: str, finding: TriageFinding) -> str:
    """SeriesDescription from the configured template ("AI TRIAGE {verdict} {score}")."""
    try:
        text = template.format(
            verdict=verdict_label(finding.verdict),
            score=format_score(finding.score),
            threshold=f"{finding.threshold:.2f}",
            priority=finding.priority.upper(),
        )
    except (KeyError, IndexError, ValueError) as e:
        raise OutputError(
            f"series_description template {template!r} is invalid ({e}); "
            "use {verdict}, {score}, {threshold} or {priority}"
        ) from e
    return clip_lo(text)


def _ref_item(ds: pydicom.Dataset, purpose: CodedConcept | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    if purpose is not None:
        item.PurposeOfReferenceCodeSequence = [purpose]
    return item


def build_sc_series(
    source: Sequence[pydicom.Dataset],
    finding: TriageFinding,
    algorithm: AlgorithmInfo,
    images: np.ndarray,
    heatmaps: np.ndarray,
    *,
    uid_key: str,
    series_description: str = "AI TRIAGE {verdict} {score}",
    opacity: float = 0.45,
    colormap: str = "inferno",
    out_size: int = 512,
    series_number: int = 9902,
    heat_max: float | None = None,
    heat_floor: float = 0.2,
    pixel_spacing_mm: float | None = None,
    content_datetime: datetime | None = None,
) -> list[hd.sc.SCImage]:
    """One RGB secondary capture per top slice, same order as ``finding.top_slices``.

    ``images``/``heatmaps`` are (K, S, S) model-space slices (LPS: columns towards the
    patient's left, rows towards posterior). ``heat_max`` fixes the display scale (e.g. the
    operating threshold's typical heat) so colours mean the same across studies; without it the
    maximum over the series is used. ``pixel_spacing_mm`` is the model-grid spacing; when given,
    PixelSpacing of the upscaled image is written. UIDs derive from ``uid_key`` and the source
    image, so a retried job re-creates the same instances.
    """
    if not uid_key:
        raise OutputError("uid_key must not be empty")
    validate_finding(finding)
    validate_algorithm(algorithm)
    top = top_slice_headers(finding, index_source(source))
    images, heatmaps = _checked_slices(images, heatmaps, len(top), out_size)
    if not top:
        log.info("no top slices: no secondary capture built")
        return []
    heat_max = _display_max(heat_max, heatmaps)

    spacing = None
    if pixel_spacing_mm is not None:
        s = float(pixel_spacing_mm) * images.shape[1] / out_size
        spacing = (s, s)
    series = _SeriesInfo(
        finding=finding,
        algorithm=algorithm,
        uid_key=uid_key,
        style=_Style(opacity, colormap, out_size, heat_max, heat_floor),
        series_uid=derive_uid(uid_key, "sc-series"),
        series_number=series_number,
        description=_fill_template(series_description, finding),
        pixel_spacing=spacing,
        content_datetime=content_datetime,
        equipment=_equipment(algorithm),
    )
    out = [
        _sc_image(series, ref, slice_score, rank, len(top), image, heat)
        for rank, ((ref, slice_score), image, heat) in enumerate(
            zip(top, images, heatmaps, strict=True), start=1
        )
    ]
    log.info(
        "built SC series %s: %d image(s), verdict %s, score %s",
        series.series_uid,
        len(out),
        finding.verdict,
        format_score(finding.score),
    )
    return out


@dataclass(frozen=True)
class _Style:
    """How the heat map is drawn (the ``build_sc_series`` options of the same names)."""

    opacity: float
    colormap: str
    out_size: int
    heat_max: float
    heat_floor: float


@dataclass(frozen=True)
class _SeriesInfo:
    """What every image of the secondary-capture series shares."""

    finding: TriageFinding
    algorithm: AlgorithmInfo
    uid_key: str
    style: _Style
    series_uid: str
    series_number: int
    description: str
    pixel_spacing: tuple[float, float] | None
    content_datetime: datetime | None
    equipment: hd.ContributingEquipment


def _checked_slices(
    images: np.ndarray, heatmaps: np.ndarray, count: int, out_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """``images`` and ``heatmaps`` as float32 (K, S, S) arrays, one per top slice."""
    images = np.asarray(images, dtype=np.float32)
    heatmaps = np.asarray(heatmaps, dtype=np.float32)
    if images.ndim != 3 or images.shape != heatmaps.shape:
        raise OutputError(
            f"images and heatmaps must both be (K, S, S), got {images.shape} and {heatmaps.shape}"
        )
    if images.shape[0] != count:
        raise OutputError(
            f"{images.shape[0]} images for {count} top slices; pass one per finding.top_slices"
        )
    if out_size < 64:
        raise OutputError(f"out_size must be at least 64 pixels, got {out_size}")
    return images, heatmaps


def _display_max(heat_max: float | None, heatmaps: np.ndarray) -> float:
    """The heat shown at full colour: ``heat_max`` if given, else the series' maximum."""
    if heat_max is None:
        heat_max = float(np.nanmax(heatmaps)) if heatmaps.size else 0.0
    if not np.isfinite(heat_max) or heat_max < 0:
        raise OutputError(f"heat_max must be a finite non-negative number, got {heat_max}")
    return heat_max


def _equipment(algorithm: AlgorithmInfo) -> hd.ContributingEquipment:
    """The detector as contributing (processing) equipment, weights hash included."""
    return hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer[:64],
        purpose_of_reference=PURPOSE_PROCESSING,
        manufacturer_model_name=algorithm.name[:64],
        software_versions=algorithm.version[:64],
        contribution_description=(
            f"Anomaly heat map overlay; weights sha256 {algorithm.weights_sha256}"
        )[:64],
    )


def _slice_label(ref: pydicom.Dataset) -> str:
    """Where the slice lies, as the radiologist finds it in the CT: image number and table
    position (z of ImagePositionPatient, mm)."""
    parts = []
    if ref.get("InstanceNumber") not in (None, ""):
        parts.append(f"image {ref.InstanceNumber}")
    pos = ref.get("ImagePositionPatient")
    if pos is not None and len(pos) == 3:
        parts.append(f"z {float(pos[2]):.1f} mm")
    return ", ".join(parts) or "slice"


def _sc_image(
    series: _SeriesInfo,
    ref: pydicom.Dataset,
    slice_score: float,
    rank: int,
    count: int,
    image: np.ndarray,
    heat: np.ndarray,
) -> hd.sc.SCImage:
    """The secondary capture of the ``rank``-th of ``count`` top slices (source header ``ref``)."""
    finding, algorithm, style = series.finding, series.algorithm, series.style
    lines = (
        BANNER_TEXT,
        f"{verdict_label(finding.verdict)}  series score {format_score(finding.score)} / "
        f"threshold {finding.threshold:.2f}  |  {_slice_label(ref)}: slice score "
        f"{slice_score:.2f}, rank {rank} of {count}",
    )
    pixels = render_overlay(
        image,
        heat,
        heat_max=style.heat_max,
        lines=lines,
        opacity=style.opacity,
        colormap=style.colormap,
        out_size=style.out_size,
        heat_floor=style.heat_floor,
    )
    day, time = split_datetime(series.content_datetime)
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series.series_uid,
            series_number=series.series_number,
            sop_instance_uid=derive_uid(series.uid_key, "sc-instance", str(ref.SOPInstanceUID)),
            instance_number=rank,
            manufacturer=algorithm.manufacturer[:64],
            patient_orientation=("L", "P"),
            pixel_spacing=series.pixel_spacing,  # type: ignore[arg-type]  # mm, not int
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[series.equipment],
            series_description=series.description,
            manufacturer_model_name=algorithm.name[:64],
            software_versions=algorithm.version[:64],
            content_date=day,
            content_time=time,
            series_date=day,
            series_time=time,
        )
    except (ValueError, TypeError, AttributeError) as e:
        raise OutputError(f"secondary capture {rank}: {e}") from e
    _describe(sc, ref, lines[1], series)
    return sc


def _describe(sc: hd.sc.SCImage, ref: pydicom.Dataset, details: str, series: _SeriesInfo) -> None:
    """Attributes highdicom does not set: burned-in text, derivation, source references."""
    algorithm, style = series.algorithm, series.style
    # General Series Laterality is 2C on BodyPartExamined; a head is not a paired organ
    sc.BodyPartExamined = str(getattr(ref, "BodyPartExamined", "") or "HEAD")
    pin_times(sc, series.content_datetime)
    sc.ConversionType = "WSD"  # made by a workstation, not captured from a video interface
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.LossyImageCompression = "00"
    sc.ImageComments = f"{BANNER_TEXT}. {details}"[:10240]
    sc.DerivationDescription = (
        f"Brain window (0-80 HU) with anomaly heat map ({style.colormap}, opacity "
        f"{style.opacity:.2f}); {algorithm.name} {algorithm.version}, weights sha256 "
        f"{algorithm.weights_sha256}"
    )[:1024]
    sc.ReferencedImageSequence = [_ref_item(ref)]
    sc.SourceImageSequence = [_ref_item(ref, PURPOSE_SOURCE)]
