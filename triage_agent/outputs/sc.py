"""Most suspicious slices -> RGB secondary-capture series with the heat map burned in.

Why a secondary capture: every PACS viewer shows an SC image, so the radiologist sees *where*
the detector looked without a special viewer or plug-in. The overlay, the verdict, the
orientation markers and the "not for diagnosis" banner are burned into the pixels
(BurnedInAnnotation YES) because overlays and presentation states are dropped by too many
archives and routers.

What a radiologist reads at a glance:

* the CT in the brain window the detector saw (W80/L40: 0-80 HU), upscaled to ``out_size``, in
  radiological convention: the patient's right on the viewer's left, anterior at the top;
* the heat map, normalised by a fixed display maximum (``heat_max``) or by the maximum over the
  series, where it exceeds ``heat_floor`` of that maximum: by default (``overlay="outline"``) an
  outline around that region with a light fill (``opacity``, 0 for none), so the density
  inside stays readable; ``overlay="blend"`` colours the region instead (soft edges, the
  colour fading in between ``heat_floor`` and twice that);
* orientation markers ("R", "L", "A", "P") at the image edges, derived from the direction
  cosines of the rendered pixels (the model grid: preprocessing undoes the scanner's flips,
  so a series stored flipped gets the same, correct markers);
* a dark banner above the image (not over it: no anatomy is hidden) with "AI TRIAGE - NOT FOR
  DIAGNOSIS", the verdict, the series score and threshold, and the slice's image number, table
  position (z, mm), score and rank; the images follow the anatomy (inferior to superior, as
  InstanceNumber) and the highest-scoring one carries a red "MOST SUSPICIOUS" tag and frame
  (blue "HIGHEST SCORE" where the SR does not call the slice suspicious: a series that is not
  abnormal, or a slice below the threshold).

Text is drawn with Pillow (a dependency of matplotlib) in the DejaVu Sans font that matplotlib
bundles, so the look does not depend on system fonts.
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

from triage_agent.ingest import short_id
from triage_agent.outputs.common import (
    AlgorithmInfo,
    OutputError,
    TopSlice,
    TriageFinding,
    anatomical_order,
    clip_lo,
    derive_uid,
    format_score,
    index_source,
    is_suspicious,
    pin_times,
    slice_label,
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
#: Tag and frame of the highest-scoring image: red where suspicious, blue otherwise.
TAG_SUSPICIOUS = (200, 32, 32)
TAG_HIGHEST = (40, 110, 190)
#: Orientation markers: near-white letters with a black edge, legible over bone and air.
MARKER_FILL = (245, 245, 245)
MARKER_EDGE = (0, 0, 0)
#: How the heat map is drawn: an outline around the region (with a fill of ``opacity``) or
#: the region coloured at ``opacity``.
OVERLAYS: tuple[str, ...] = ("outline", "blend")
#: Rec. 709 luminance weights of R, G, B: the outline's fill keeps this (the grey level).
LUMA = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
#: Direction cosines (row, then column; LPS) of the model grid: columns towards the patient's
#: left, rows towards posterior. Preprocessing turns every accepted axial series into this.
AXIAL_LPS: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: DCM 121322 "Source image for image processing operation" (CID 7202).
PURPOSE_SOURCE = CodedConcept("121322", "DCM", "Source image for image processing operation")
#: DCM 109102 "Processing Equipment" (CID 7005): the detector, as contributing equipment.
PURPOSE_PROCESSING = CodedConcept("109102", "DCM", "Processing Equipment")


@dataclass(frozen=True)
class Tag:
    """The label of the highest-scoring image: its text and box colour."""

    text: str
    colour: tuple[int, int, int]


# ------------------------------------------------------------------------------ orientation


def _letter(vector: np.ndarray) -> str:
    """Patient direction (DICOM PatientOrientation letter) a unit vector mostly points to."""
    axis = int(np.argmax(np.abs(vector)))
    positive = bool(vector[axis] > 0)
    return (("L", "R"), ("P", "A"), ("H", "F"))[axis][0 if positive else 1]


def _cosines(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines of an ImageOrientationPatient-like 6-vector."""
    try:
        v = np.asarray([float(c) for c in orientation], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise OutputError(f"orientation must be 6 direction cosines, got {orientation!r}") from e
    if v.shape != (6,) or not np.all(np.isfinite(v)):
        raise OutputError(f"orientation must be 6 finite direction cosines, got {orientation!r}")
    row, col = v[:3], v[3:]
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6:
        raise OutputError(f"orientation has a zero direction vector: {orientation!r}")
    return row, col


def patient_orientation(orientation: Sequence[float]) -> tuple[str, str]:
    """DICOM PatientOrientation of an image whose rows and columns run along ``orientation``
    (row cosines, then column cosines): where the row and the column point to ("L", "P")."""
    row, col = _cosines(orientation)
    return _letter(row), _letter(col)


def edge_letters(orientation: Sequence[float]) -> dict[str, str]:
    """Which patient side lies at each edge of the image: {"left", "right", "top", "bottom"}
    -> letter. For the model grid (``AXIAL_LPS``): R left, L right, A top, P bottom."""
    row, col = _cosines(orientation)
    return {
        "left": _letter(-row),
        "right": _letter(row),
        "top": _letter(-col),
        "bottom": _letter(col),
    }


def grid_orientation(yaw_rad: float = 0.0) -> tuple[float, ...]:
    """Direction cosines of the model grid when preprocessing turned it by ``yaw_rad`` in
    plane (``ModelInput.yaw_rad``, head-midline alignment); ``AXIAL_LPS`` when not turned."""
    c, s = float(np.cos(yaw_rad)), float(np.sin(yaw_rad))
    return (c, -s, 0.0, s, c, 0.0)


# ------------------------------------------------------------------------------ rendering


@lru_cache(maxsize=16)
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
    """Rows of the banner for an image ``out_size`` wide (three lines of text)."""
    return max(42, int(round(out_size * 0.16)))


def _draw_banner(width: int, lines: Sequence[str], tag: Tag | None = None) -> np.ndarray:
    """(banner_height, width, 3) uint8 banner: the warning line, up to two detail lines, and
    ``tag`` in a coloured box at the end of the last line."""
    from PIL import Image, ImageDraw

    h = banner_height(width)
    img = Image.new("RGB", (width, h), BANNER_BG)
    draw = ImageDraw.Draw(img)
    pad = max(2, h // 14)
    step = (h - 2 * pad) / 3.0
    shown = list(lines[:3])
    for i, text in enumerate(shown):
        bold = i == 0
        with_tag = tag if (i == len(shown) - 1 and i > 0) else None
        size = max(7, int(step * (0.80 if bold else 0.72)))

        def line_width(
            sz: int, text: str = text, bold: bool = bold, with_tag: Tag | None = with_tag
        ) -> float:
            w = draw.textlength(text, font=_font(sz, bold))
            if with_tag is not None:
                w += draw.textlength(with_tag.text, font=_font(sz, True)) + 1.2 * sz
            return w

        # shrink until the line fits the width (long site-specific texts)
        while size > 6 and line_width(size) > width - 2 * pad:
            size -= 1
        font = _font(size, bold)
        y = pad + int(round(i * step + (step - size * 1.15) / 2))
        draw.text((pad, y), text, fill=BANNER_WARN if bold else BANNER_INFO, font=font)
        if with_tag is not None:
            tag_font = _font(size, True)
            tw = draw.textlength(with_tag.text, font=tag_font)
            # after the text; over its end when even the smallest letters do not fit
            x0 = min(
                pad + draw.textlength(text, font=font) + size * 0.6, width - pad - tw - size * 0.6
            )
            draw.rectangle(
                (x0, y - 1, x0 + tw + size * 0.6, y + int(size * 1.2)), fill=with_tag.colour
            )
            draw.text((x0 + size * 0.3, y), with_tag.text, fill=(255, 255, 255), font=tag_font)
    return np.asarray(img, dtype=np.uint8)


def _marker_geometry(out_size: int) -> tuple[int, int, int]:
    """Frame width, letter height (px) and letter inset from the edge for an image size."""
    border = max(2, out_size // 128)
    return border, max(12, int(round(out_size * 0.07))), border + max(2, out_size // 64)


def _draw_markers(
    body: np.ndarray, letters: dict[str, str], frame: tuple[int, int, int] | None
) -> np.ndarray:
    """Orientation letters at the middle of each image edge, and a ``frame`` colour border."""
    from PIL import Image, ImageDraw

    size = body.shape[0]
    border, letter_px, inset = _marker_geometry(size)
    img = Image.fromarray(body)
    draw = ImageDraw.Draw(img)
    if frame is not None:
        draw.rectangle((0, 0, size - 1, size - 1), outline=frame, width=border)
    font = _font(letter_px, True)
    stroke = max(1, size // 200)
    for edge, letter in letters.items():
        left, top, right, bottom = draw.textbbox((0, 0), letter, font=font, stroke_width=stroke)
        w, h = right - left, bottom - top
        x = {"left": inset, "right": size - inset - w}.get(edge, (size - w) // 2)
        y = {"top": inset, "bottom": size - inset - h}.get(edge, (size - h) // 2)
        draw.text(
            (x - left, y - top),
            letter,
            font=font,
            fill=MARKER_FILL,
            stroke_width=stroke,
            stroke_fill=MARKER_EDGE,
        )
    return np.asarray(img, dtype=np.uint8)


def marker_box(out_size: int, edge: str) -> tuple[slice, slice]:
    """(rows, columns) of the image body holding the marker of ``edge`` ("left", "right",
    "top", "bottom"): a square a little larger than the letter, at the middle of that edge."""
    border, letter_px, inset = _marker_geometry(out_size)
    span = int(letter_px * 1.3) + 2
    lo = out_size // 2 - span // 2
    mid = slice(lo, lo + span)
    near = slice(border, inset + span)
    far = slice(out_size - inset - span, out_size - border)
    boxes = {"left": (mid, near), "right": (mid, far), "top": (near, mid), "bottom": (far, mid)}
    if edge not in boxes:
        raise OutputError(f"edge must be one of {sorted(boxes)}, got {edge!r}")
    return boxes[edge]


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
    overlay: str = "outline",
    opacity: float = 0.3,
    colormap: str = "inferno",
    out_size: int = 512,
    heat_floor: float = 0.2,
    orientation: Sequence[float] | None = AXIAL_LPS,
    tag: Tag | None = None,
) -> np.ndarray:
    """One slice -> (banner + out_size, out_size, 3) uint8 RGB picture.

    ``image`` is the windowed CT in 0..1; ``heat_floor`` is a fraction of ``heat_max``: below it
    the pixel keeps its grey level. ``overlay="outline"`` draws a line just outside the region
    above the floor (never over it) and tints the region by ``opacity`` without changing its
    brightness (the line colour less its own luminance: the density stays readable; at 0 the
    CT inside is untouched); ``"blend"`` colours the region at ``opacity``, fading in between ``heat_floor``
    and twice that, so it has soft edges instead of a contour that could be mistaken for a
    segmentation. ``orientation`` (direction cosines of the image rows and columns) places the
    "R"/"L"/"A"/"P" markers; None draws none. ``tag`` marks the highest-scoring image (a box at
    the end of the banner's last line and a frame of its colour around the image).
    """
    import matplotlib

    if image.ndim != 2 or image.shape != heatmap.shape or image.shape[0] != image.shape[1]:
        raise OutputError(
            f"image and heat map must be the same square (S, S) shape, got {image.shape} "
            f"and {heatmap.shape}"
        )
    if overlay not in OVERLAYS:
        raise OutputError(f"overlay must be one of {OVERLAYS}, got {overlay!r}")
    if not (0.0 <= opacity <= 1.0):
        raise OutputError(f"opacity must be within 0..1, got {opacity}")
    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError as e:
        raise OutputError(f"unknown matplotlib colormap {colormap!r}") from e
    letters = edge_letters(orientation) if orientation is not None else {}

    grey = np.clip(_upscale(np.nan_to_num(image), out_size), 0.0, 1.0)  # (O, O)
    heat = np.maximum(_upscale(np.nan_to_num(heatmap), out_size), 0.0)
    hn = np.clip(heat / heat_max, 0.0, 1.0) if heat_max > 0 else np.zeros_like(heat)
    region = hn > heat_floor
    if overlay == "outline":
        # tint without changing brightness: the colour's own luminance (Rec. 709) is taken
        # out, so the grey level (the density) inside the region is kept
        line = np.asarray(cmap(0.85)[:3], dtype=np.float32)
        tint = opacity * (line - float(LUMA @ line))
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        rgb[region] += tint
        width = max(1, int(round(out_size / 200)))
        rgb[ndi.binary_dilation(region, iterations=width) & ~region] = line
    else:
        alpha = opacity * np.clip((hn - heat_floor) / max(heat_floor, 1e-3), 0.0, 1.0)
        colour = cmap(hn)[..., :3].astype(np.float32)  # (O, O, 3)
        rgb = grey[..., None] * (1.0 - alpha[..., None]) + colour * alpha[..., None]
    body = np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    if letters or tag is not None:
        body = _draw_markers(body, letters, tag.colour if tag is not None else None)
    return np.concatenate([_draw_banner(out_size, lines, tag), body], axis=0)


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


def _ref_item(ts: TopSlice, purpose: CodedConcept | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ts.header.SOPClassUID
    item.ReferencedSOPInstanceUID = ts.header.SOPInstanceUID
    if ts.frame is not None:
        item.ReferencedFrameNumber = ts.frame
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
    overlay: str = "outline",
    opacity: float = 0.3,
    colormap: str = "inferno",
    out_size: int = 512,
    series_number: int = 9902,
    heat_max: float | None = None,
    heat_floor: float = 0.2,
    pixel_spacing_mm: float | None = None,
    orientation: Sequence[float] = AXIAL_LPS,
    content_datetime: datetime | None = None,
) -> list[hd.sc.SCImage]:
    """One RGB secondary capture per top slice, in anatomical order (inferior to superior by
    table position; InstanceNumber 1, 2, ... follows it), the highest-scoring one tagged.

    ``images``/``heatmaps`` are (K, S, S) model-space slices, one per ``finding.top_slices``
    entry in that order; ``orientation`` gives the direction cosines of their rows and columns
    (``AXIAL_LPS``: columns towards the patient's left, rows towards posterior;
    ``grid_orientation(yaw)`` when preprocessing turned the grid), from which the orientation
    markers and PatientOrientation follow. ``overlay``/``opacity`` choose how the heat map is
    drawn (``render_overlay``). ``heat_max`` fixes the display scale (e.g. the operating
    threshold's typical heat) so colours mean the same across studies; without it the maximum
    over the series is used. ``pixel_spacing_mm`` is the model-grid spacing; when given,
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
    if overlay not in OVERLAYS:
        raise OutputError(f"overlay must be one of {OVERLAYS}, got {overlay!r}")
    patient_orientation(orientation)  # checked before any image is drawn

    spacing = None
    if pixel_spacing_mm is not None:
        s = float(pixel_spacing_mm) * images.shape[1] / out_size
        spacing = (s, s)
    series = _SeriesInfo(
        finding=finding,
        algorithm=algorithm,
        uid_key=uid_key,
        style=_Style(
            overlay,
            opacity,
            colormap,
            out_size,
            heat_max,
            heat_floor,
            tuple(float(c) for c in orientation),
        ),
        series_uid=derive_uid(uid_key, "sc-series"),
        series_number=series_number,
        description=_fill_template(series_description, finding),
        pixel_spacing=spacing,
        content_datetime=content_datetime,
        equipment=_equipment(algorithm),
    )
    out = [
        _sc_image(series, top[i], _Place(i + 1, len(top), number), images[i], heatmaps[i])
        for number, i in enumerate(anatomical_order(top), start=1)
    ]
    log.info(
        "built SC series %s: %d image(s), verdict %s, score %s",
        short_id(series.series_uid),
        len(out),
        finding.verdict,
        format_score(finding.score),
    )
    return out


@dataclass(frozen=True)
class _Style:
    """How the heat map is drawn (the ``build_sc_series`` options of the same names)."""

    overlay: str
    opacity: float
    colormap: str
    out_size: int
    heat_max: float
    heat_floor: float
    orientation: tuple[float, ...]


@dataclass(frozen=True)
class _Place:
    """Where an image stands: its score rank (1 = highest) of ``count``, and its number in
    anatomical order (InstanceNumber)."""

    rank: int
    count: int
    number: int


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


def _tag(finding: TriageFinding, slice_score: float) -> Tag:
    """The "MOST SUSPICIOUS" tag where the SR calls the slice suspicious, else "HIGHEST SCORE"."""
    if is_suspicious(finding, slice_score):
        return Tag("MOST SUSPICIOUS", TAG_SUSPICIOUS)
    return Tag("HIGHEST SCORE", TAG_HIGHEST)


def _sc_image(
    series: _SeriesInfo,
    ts: TopSlice,
    place: _Place,
    image: np.ndarray,
    heat: np.ndarray,
) -> hd.sc.SCImage:
    """The secondary capture of one top slice at ``place``."""
    finding, algorithm, style = series.finding, series.algorithm, series.style
    ref, slice_score = ts.header, ts.score
    # a frame of a multi-frame image gets an instance of its own
    key = [str(ref.SOPInstanceUID)] + ([f"frame {ts.frame}"] if ts.frame is not None else [])
    tag = _tag(finding, slice_score) if place.rank == 1 else None
    lines = (
        BANNER_TEXT,
        f"{verdict_label(finding.verdict)}  series score {format_score(finding.score)} / "
        f"threshold {finding.threshold:.2f}",
        f"{slice_label(ref, ts.frame)}  slice score {slice_score:.2f}, rank {place.rank} of {place.count}",
    )
    pixels = render_overlay(
        image,
        heat,
        heat_max=style.heat_max,
        lines=lines,
        overlay=style.overlay,
        opacity=style.opacity,
        colormap=style.colormap,
        out_size=style.out_size,
        heat_floor=style.heat_floor,
        orientation=style.orientation,
        tag=tag,
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
            sop_instance_uid=derive_uid(series.uid_key, "sc-instance", *key),
            instance_number=place.number,
            manufacturer=algorithm.manufacturer[:64],
            patient_orientation=patient_orientation(style.orientation),
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
        raise OutputError(f"secondary capture {place.number}: {e}") from e
    details = f"{lines[1]}. {lines[2]}" + (f". {tag.text}" if tag is not None else "")
    _describe(sc, ts, details, series)
    return sc


def _describe(sc: hd.sc.SCImage, ts: TopSlice, details: str, series: _SeriesInfo) -> None:
    """Attributes highdicom does not set: burned-in text, derivation, source references."""
    algorithm, style, ref = series.algorithm, series.style, ts.header
    # General Series Laterality is 2C on BodyPartExamined; a head is not a paired organ
    sc.BodyPartExamined = str(getattr(ref, "BodyPartExamined", "") or "HEAD")
    pin_times(sc, series.content_datetime)
    sc.ConversionType = "WSD"  # made by a workstation, not captured from a video interface
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.LossyImageCompression = "00"
    sc.ImageComments = f"{BANNER_TEXT}. {details}"[:10240]
    drawn = ("outlined" if style.overlay == "outline" else "blended") + (
        f", {style.colormap}, fill opacity {style.opacity:.2f}"
    )
    sc.DerivationDescription = (
        f"Brain window W80/L40 (0-80 HU) with anomaly heat map ({drawn}) where it exceeds "
        f"{style.heat_floor:.0%} of {style.heat_max:.3g}; orientation markers; "
        f"{algorithm.name} {algorithm.version}, weights sha256 {algorithm.weights_sha256}"
    )[:1024]
    sc.ReferencedImageSequence = [_ref_item(ts)]
    sc.SourceImageSequence = [_ref_item(ts, PURPOSE_SOURCE)]
