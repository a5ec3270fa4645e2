"""DICOM series -> HU volume -> model inputs.

Why a separate stage: the detector sees fixed-size, brain-windowed, head-centred axial slices,
whatever the scanner's matrix, field of view, slice order, rescale or orientation flips were.
Everything that can be wrong with a series (mixed series, missing pixels, gaps) is caught here
and raised as a ``PreprocessError`` naming the stage, so the worker can record a clear
"not assessable" reason instead of scoring garbage.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.multival import MultiValue
from scipy import ndimage as ndi

if TYPE_CHECKING:  # pragma: no cover
    from triage_model.synth import SynthCase

log = logging.getLogger(__name__)

#: Largest tolerated deviation of a slice gap from the median gap (fraction of the median).
SPACING_TOLERANCE = 0.1
#: Axial means the slice normal is within this many degrees of the scanner z axis.
MAX_TILT_DEG = 35.0


class PreprocessError(Exception):
    """A series cannot be turned into model input; the message names the stage and the cause."""


@dataclass
class HUVolume:
    """Axial CT volume in Hounsfield units, Z inferior->superior, rows anterior->posterior,
    columns patient right->left (LPS, like a DICOM axial series with identity orientation)."""

    hu: np.ndarray  # (Z, Y, X) float32
    spacing_mm: tuple[float, float, float]  # (z, y, x); z along the slice normal
    sop_instance_uids: list[str | None]  # one per z slice (None for synthetic volumes)
    series_instance_uid: str | None = None
    #: Patient-space step (mm, in (z, y, x) order) of one index along each array axis, as
    #: columns; set only when the stack is not an orthogonal grid (gantry tilt: the slices
    #: are tilted and the stack is sheared). ``correct_tilt`` resamples such a volume.
    affine_zyx: np.ndarray | None = None
    #: 1-based frame number of each z slice in its (multi-frame) instance; None for a series of
    #: single-frame images (then every slice is its own SOP instance).
    frame_numbers: list[int | None] | None = None


@dataclass(frozen=True)
class PreprocessOptions:
    """Switchable steps that remove what a site changes before the detector sees a series.

    * ``correct_tilt``: resample a gantry-tilted (sheared) stack onto an orthogonal grid, so
      that slices are perpendicular to the table axis like an untilted scan's.
    * ``slab_mm``: average slices thinner than half of this into slabs about this thick (0:
      keep the slices); the detector was trained on 2.5-5 mm slices, and thin ones are
      noisier and many more.
    * ``align_yaw``: turn each slice about the head centre so that the head's midline runs
      along the image columns (the head's in-plane rotation undone).
    * ``max_noise_hu``: when the fine-grained noise in the brain at model resolution
      (``brain_noise_hu``) exceeds this, smooth the slices in-plane just enough to bring it
      down (a sharp kernel or thin slices made noisier than the training data; 0: off).

    Defaults, as measured on the synthetic development sites (``python -m
    triage_agent.site_eval``): tilt correction is off, because on 5 mm slices tilted 12-20
    degrees it lowered the bundled detector's zero-shot series AUROC (0.48 against 0.73 without
    it, 16 test series): interpolating between thick tilted slices smears the skull edges,
    which the detector scores as abnormal. Slabs of 5 mm are on: they leave the 2.5-5 mm
    series the detector was trained on unchanged and cut a 1-1.25 mm series' scoring work about
    four-fold. Yaw alignment and the noise limit are off (not shown to help).
    """

    correct_tilt: bool = False
    slab_mm: float = 5.0
    align_yaw: bool = False
    max_noise_hu: float = 0.0


DEFAULT_OPTIONS = PreprocessOptions()


@dataclass
class ModelInput:
    """Fixed-size slices for the detector plus what is needed to map results back."""

    x: np.ndarray  # (N, S, S) float32 in [0, 1], brain window
    brain: np.ndarray  # (N, S, S) bool brain mask
    slice_index: np.ndarray  # (N,) int: z index in the HUVolume of each kept slice
    lesion: np.ndarray | None = None  # (N, S, S) bool when a lesion mask was given
    hu: np.ndarray | None = None  # (N, S, S) float32 HU at model resolution (for baselines)
    pixel_mm: float = 0.0  # in-plane spacing of the model grid
    centre_yx_mm: tuple[float, float] = (0.0, 0.0)  # model-grid centre, mm from pixel (0, 0)
    yaw_rad: float = 0.0  # model rows turned by this angle from the image columns (align_yaw)


# --------------------------------------------------------------------------------- reading


def _f(ds: object, name: str, stage: str) -> Any:
    """A required attribute, or a PreprocessError naming the stage and the attribute."""
    v = getattr(ds, name, None)
    if v is None:
        raise PreprocessError(f"{stage}: missing {name}")
    return v


def _numbers(ds: Any, keyword: str, n: int, stage: str, name: str,
             default: list[float] | None = None) -> list[float]:
    """Exactly ``n`` finite numbers from a header attribute, or PreprocessError naming the
    attribute (never its value: header text is sender-controlled and may carry identifiers)."""
    value = ds.get(keyword)
    if value is None or value == "":
        if default is not None:
            return list(default)
        raise PreprocessError(f"{stage}: {name} has no {keyword}")
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError) as e:
        raise PreprocessError(f"{stage}: {name} has a non-numeric {keyword}") from e
    if len(out) != n or not all(np.isfinite(out)):
        raise PreprocessError(f"{stage}: {name} needs {n} finite value(s) in {keyword}")
    return out


def read_series(paths: Sequence[Path]) -> HUVolume:
    """Read one axial CT series in any file order into a HU volume.

    Slices are sorted by their position along the slice normal (not by InstanceNumber, which
    scanners and routers get wrong), each slice's own rescale slope/intercept is applied, and
    orientation flips are undone so the array is LPS. The frames of an enhanced (multi-frame)
    CT image are slices like single-frame images, their geometry and rescale read from the
    per-frame or shared functional groups. Mixed series, missing pixel data, non-uniform gaps,
    duplicate positions and single slices raise ``PreprocessError``.
    """
    datasets = _read_files([Path(p) for p in paths])
    series_uid = _one_series(datasets)
    datasets = _frames(datasets)
    if len(datasets) < 2:
        raise PreprocessError(
            f"read: a volume needs at least 2 slices, got {len(datasets)} image(s)")
    first_path, first = datasets[0]
    iop = np.array(_numbers(first, "ImageOrientationPatient", 6, "geometry", first_path.name))
    normal = _axial_normal(iop)
    rows, cols = int(_f(first, "Rows", "read")), int(_f(first, "Columns", "read"))
    spacing = _numbers(first, "PixelSpacing", 2, "geometry", first_path.name)
    order, step, dz = _slice_order(datasets, iop, normal, rows, cols)
    hu, uids = _hu_slices(datasets, order, rows, cols)
    frames: list[int | None] = [getattr(datasets[i][1], "frame_number", None) for i in order]
    hu, uids, spacing, affine = _to_lps(hu, uids, iop, normal, step, spacing, dz)
    if normal[2] < 0:  # _to_lps reversed the slices
        frames = frames[::-1]
    vol = HUVolume(
        hu=np.ascontiguousarray(hu, dtype=np.float32),
        spacing_mm=(dz, float(spacing[0]), float(spacing[1])),
        sop_instance_uids=uids,
        series_instance_uid=series_uid,
        affine_zyx=affine,
        frame_numbers=frames if any(f is not None for f in frames) else None,
    )
    log.debug("read series: %d slices, spacing %s", len(uids), vol.spacing_mm)
    return vol


def _read_files(paths: list[Path]) -> list[tuple[Path, Any]]:
    """Every file parsed (pixels decoded later), or a read-stage error naming the file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not paths:
        raise PreprocessError("read: a volume needs at least 2 slices, got 0 file(s)")
    datasets = []
    for p in paths:
        try:
            datasets.append((p, pydicom.dcmread(p)))
        except (InvalidDicomError, OSError, EOFError, ValueError) as e:
            raise PreprocessError(f"read: {p.name} is not a readable DICOM file ({e})") from e
    return datasets


class _Frame:
    """One frame of an enhanced (multi-frame) CT image, read like a single-frame slice: the
    attributes ``read_series`` uses, from the frame's per-frame functional groups, else the
    shared ones, else the top level; ``pixel_array`` is the frame's stored values."""

    _GROUPS = (("PlaneOrientationSequence", ("ImageOrientationPatient",)),
               ("PlanePositionSequence", ("ImagePositionPatient",)),
               ("PixelMeasuresSequence", ("PixelSpacing", "SliceThickness")),
               ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")))

    def __init__(self, ds: Any, index: int, pixels: Any) -> None:
        from triage_agent.dicom_uids import functional_group

        self._pixels = pixels
        self._index = index
        self.frame_number = index + 1
        attrs: dict[str, Any] = {}
        for kw in ("Rows", "Columns", "SOPInstanceUID", "SeriesInstanceUID"):
            if kw in ds:
                attrs[kw] = ds.get(kw)
        for seq, keywords in self._GROUPS:
            item = functional_group(ds, seq, index)
            for kw in keywords:
                value = item.get(kw) if item is not None else None
                value = ds.get(kw) if value is None else value
                if value is not None:
                    attrs[kw] = value
        if "PixelData" in ds:
            attrs["PixelData"] = True
        self._attrs = attrs

    def get(self, keyword: str, default: Any = None) -> Any:
        return self._attrs.get(keyword, default)

    def __contains__(self, keyword: str) -> bool:
        return keyword in self._attrs

    def __getattr__(self, keyword: str) -> Any:
        if keyword.startswith("_"):
            raise AttributeError(keyword)
        try:
            return self._attrs[keyword]
        except KeyError:
            raise AttributeError(keyword) from None

    @property
    def pixel_array(self) -> np.ndarray:
        return self._pixels()[self._index]


def _frames(datasets: list[tuple[Path, Any]]) -> list[tuple[Path, Any]]:
    """Single-frame images as they are; each frame of a multi-frame image as a ``_Frame``
    named "<file> frame <n>" in errors. A multi-frame image's pixels are decoded once."""
    out: list[tuple[Path, Any]] = []
    for p, ds in datasets:
        try:
            n = int(ds.get("NumberOfFrames") or 1)
        except (TypeError, ValueError) as e:
            raise PreprocessError(f"read: {p.name} has a non-numeric NumberOfFrames") from e
        if n <= 1 and "PerFrameFunctionalGroupsSequence" not in ds:
            out.append((p, ds))
            continue
        cache: list[np.ndarray] = []

        def pixels(ds: Any = ds, cache: list[np.ndarray] = cache) -> np.ndarray:
            if not cache:
                arr = ds.pixel_array
                cache.append(arr[None] if arr.ndim == 2 else arr)
            return cache[0]

        out += [(p.with_name(f"{p.name} frame {i + 1}"), _Frame(ds, i, pixels)) for i in range(n)]
    return out


def _one_series(datasets: list[tuple[Path, Any]]) -> str | None:
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in datasets}
    if len(series) != 1:
        raise PreprocessError(
            f"read: files belong to {len(series)} different series (SeriesInstanceUID); "
            "pass one series at a time"
        )
    return series.pop() or None


def _axial_normal(iop: np.ndarray) -> np.ndarray:
    """The unit slice normal of an (at most ``MAX_TILT_DEG`` tilted) axial orientation."""
    normal = np.cross(iop[:3], iop[3:])
    if np.linalg.norm(normal) < 0.5:
        raise PreprocessError("geometry: degenerate ImageOrientationPatient")
    normal /= np.linalg.norm(normal)
    tilt = float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))
    if tilt > MAX_TILT_DEG:
        raise PreprocessError(
            f"geometry: not an axial series (slice normal {tilt:.0f} deg from the z axis)"
        )
    return normal


def _slice_order(datasets: list[tuple[Path, Any]], iop: np.ndarray, normal: np.ndarray,
                 rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(file order along the normal, mean patient-space step between slices, slice spacing)
    after checking that every slice shares the geometry and the gaps are uniform."""
    positions = []
    ipps = []
    for p, ds in datasets:
        this_iop = np.array(_numbers(ds, "ImageOrientationPatient", 6, "geometry", p.name))
        if not np.allclose(this_iop, iop, atol=1e-3):
            raise PreprocessError(f"geometry: {p.name} has a different ImageOrientationPatient")
        if int(getattr(ds, "Rows", -1)) != rows or int(getattr(ds, "Columns", -1)) != cols:
            raise PreprocessError(f"read: {p.name} has a different matrix size")
        if "PixelData" not in ds:
            raise PreprocessError(f"pixels: {p.name} has no pixel data")
        ipp = _numbers(ds, "ImagePositionPatient", 3, "geometry", p.name)
        positions.append(float(np.dot(ipp, normal)))
        ipps.append(ipp)
    pos = np.array(positions)
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    ipp_sorted = np.asarray(ipps, dtype=float)[order]
    # mean patient-space step between consecutive slices (LPS x, y, z): along the normal for
    # an ordinary series, along the table axis (sheared) for a gantry-tilted one
    step = (ipp_sorted[-1] - ipp_sorted[0]) / max(len(order) - 1, 1)
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        raise PreprocessError("geometry: two or more slices share the same position")
    dz = float(np.median(gaps))
    if np.max(np.abs(gaps - dz)) > SPACING_TOLERANCE * dz + 1e-3:
        raise PreprocessError(
            f"geometry: non-uniform slice spacing (gaps {gaps.min():.2f}-{gaps.max():.2f} mm); "
            "missing or extra slices?"
        )
    return order, step, dz


def _hu_slices(datasets: list[tuple[Path, Any]], order: np.ndarray, rows: int, cols: int
               ) -> tuple[np.ndarray, list[str | None]]:
    """Decoded pixels in ``order``, each slice's own rescale applied: (Z, rows, cols) HU."""
    hu = np.empty((len(order), rows, cols), dtype=np.float32)
    uids: list[str | None] = []
    for k, i in enumerate(order):
        p, ds = datasets[i]
        try:
            arr = ds.pixel_array
        except Exception as e:  # noqa: BLE001 - any decoder failure is a pixel-stage error
            raise PreprocessError(f"pixels: cannot decode {p.name} ({e})") from e
        if arr.shape != (rows, cols):
            raise PreprocessError(f"pixels: {p.name} has pixel shape {arr.shape}")
        slope = _numbers(ds, "RescaleSlope", 1, "pixels", p.name, default=[1.0])[0] or 1.0
        intercept = _numbers(ds, "RescaleIntercept", 1, "pixels", p.name, default=[0.0])[0]
        hu[k] = arr.astype(np.float32) * slope + intercept
        uids.append(str(ds.SOPInstanceUID) if "SOPInstanceUID" in ds else None)
    return hu, uids


def _to_lps(hu: np.ndarray, uids: list[str | None], iop: np.ndarray, normal: np.ndarray,
            step: np.ndarray, spacing: list[float], dz: float
            ) -> tuple[np.ndarray, list[str | None], list[float], np.ndarray | None]:
    """Flip and transpose so that Z runs superior, columns left and rows posterior (LPS);
    returns the (z, y, x) affine of one index step when the grid is sheared (gantry tilt)."""
    row_dir, col_dir = iop[:3], iop[3:]
    # sorted slices run along +normal; make Z superior
    if normal[2] < 0:
        hu = hu[::-1]
        uids = uids[::-1]
        step = -step
    # patient-space vectors of one index step along rows (i) and columns (j), before flips
    v_i = col_dir * float(spacing[0])
    v_j = row_dir * float(spacing[1])
    ax_r, ax_c = int(np.argmax(np.abs(row_dir))), int(np.argmax(np.abs(col_dir)))
    if {ax_r, ax_c} != {0, 1}:
        raise PreprocessError("geometry: image rows/columns are not along the patient x/y axes")
    if ax_r == 1:  # columns run along y: transpose so that columns run along x
        hu = hu.transpose(0, 2, 1)
        spacing = spacing[::-1]
        row_dir, col_dir = col_dir, row_dir
        v_i, v_j = v_j, v_i
    if row_dir[0] < 0:
        hu = hu[:, :, ::-1]
        v_j = -v_j
    if col_dir[1] < 0:
        hu = hu[:, ::-1, :]
        v_i = -v_i
    # (z, y, x) columns; an orthogonal grid has no off-diagonal terms. PixelSpacing is (row
    # spacing = between rows, column spacing = between columns).
    affine = np.stack([step[::-1], v_i[::-1], v_j[::-1]], axis=1)
    off = affine - np.diag(np.diag(affine))
    sheared = bool(np.max(np.abs(off)) > 1e-3 * max(dz, 1e-3))
    return hu, uids, spacing, affine if sheared else None


def volume_from_case(case: SynthCase) -> HUVolume:
    """Synthetic case -> HUVolume without a DICOM round trip (training in memory)."""
    return HUVolume(
        hu=np.asarray(case.hu, dtype=np.float32),
        spacing_mm=tuple(float(s) for s in case.spacing_mm),  # type: ignore[arg-type]
        sop_instance_uids=[None] * int(case.hu.shape[0]),
        series_instance_uid=None,
    )


# ------------------------------------------------------------- site-independent geometry


def correct_tilt(vol: HUVolume, lesion_mask: np.ndarray | None = None
                 ) -> tuple[HUVolume, np.ndarray | None, np.ndarray]:
    """Resample a gantry-tilted (sheared) stack onto an orthogonal patient-axis grid.

    The new slices are perpendicular to the patient z axis, ``spacing_mm[0]`` apart, with the
    in-plane spacing kept; only slices that the tilted slices cover across the whole head are
    kept (a partly covered slice shows the head cut by a straight edge). Returns the
    new volume, the resampled lesion mask and, per new slice, the index of the input slice
    nearest its centre (for mapping scores back to the received images). A volume without
    ``affine_zyx`` comes back unchanged.
    """
    nz = vol.hu.shape[0]
    if vol.affine_zyx is None:
        return vol, lesion_mask, np.arange(nz)
    import SimpleITK as sitk

    a = np.asarray(vol.affine_zyx, dtype=float)
    if abs(np.linalg.det(a)) < 1e-9:
        raise PreprocessError("geometry: degenerate slice geometry (tilt correction)")
    shape = np.array(vol.hu.shape)
    corners = np.array([[k, i, j] for k in (0, shape[0] - 1) for i in (0, shape[1] - 1)
                        for j in (0, shape[2] - 1)], dtype=float)
    pts = corners @ a.T
    lo, hi = pts.min(0), pts.max(0)
    out_sp = np.array([float(vol.spacing_mm[0]), abs(float(vol.spacing_mm[1])),
                       abs(float(vol.spacing_mm[2]))])
    size = np.floor((hi - lo) / out_sp + 1e-6).astype(int) + 1
    if int(np.prod(size)) > 4 * int(np.prod(shape)) + 10**6:
        raise PreprocessError("geometry: tilt correction would grow the volume implausibly")
    # SimpleITK works in (x, y, z): the input lives in index space, the output in patient mm
    # relative to the first voxel, and the transform maps output points to input indices
    inv = np.linalg.inv(a)[::-1, ::-1]
    tx = sitk.AffineTransform(3)
    tx.SetMatrix([float(v) for v in inv.ravel()])

    def resample(arr: np.ndarray, fill: float) -> np.ndarray:
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32))
        out = sitk.Resample(img, [int(v) for v in size[::-1]], tx, sitk.sitkLinear,
                            [float(v) for v in lo[::-1]], [float(v) for v in out_sp[::-1]],
                            [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0], float(fill), sitk.sitkFloat32)
        return sitk.GetArrayFromImage(out)

    hu = resample(vol.hu, -1000.0)
    mask = None if lesion_mask is None else resample(lesion_mask.astype(np.float32), 0.0) >= 0.5
    # keep only the new slices that the tilted acquisition covered across the whole head: at
    # the bottom and top, part of a new slice lies outside every tilted slice, and a head cut
    # off by a straight edge of air is an artefact the detector would score
    covered = resample(np.ones(vol.hu.shape, np.float32), 0.0) >= 0.999
    head = (hu > -300.0).any(axis=0)
    keep = np.array([not (head & ~c).any() for c in covered])
    if not keep.any():
        raise PreprocessError("geometry: no slice covers the whole head after tilt correction")
    hu = hu[keep]
    if mask is not None:
        mask = mask[keep]
    # the input slice under the centre of each output slice
    centre = lo + (size - 1) / 2.0 * out_sp
    zq = lo[0] + np.flatnonzero(keep) * out_sp[0]
    q = np.stack([zq, np.full_like(zq, centre[1]), np.full_like(zq, centre[2])], axis=1)
    src = np.clip(np.rint((q @ np.linalg.inv(a).T)[:, 0]), 0, nz - 1).astype(int)
    out = HUVolume(hu=hu, spacing_mm=(float(out_sp[0]), float(out_sp[1]), float(out_sp[2])),
                   sop_instance_uids=[vol.sop_instance_uids[k] for k in src],
                   series_instance_uid=vol.series_instance_uid)
    return out, mask, src


def thin_to_slabs(vol: HUVolume, slab_mm: float, lesion_mask: np.ndarray | None = None
                  ) -> tuple[HUVolume, np.ndarray | None, np.ndarray]:
    """Average groups of thin slices into slabs about ``slab_mm`` thick.

    Returns the slab volume, the lesion mask (a slab holds the lesion where any of its slices
    does) and, per slab, the index of its middle input slice. Slices at least half a slab
    thick (the 2.5-5 mm series the detector was trained on, with 5 mm slabs) come back
    unchanged.
    """
    nz = vol.hu.shape[0]
    dz = float(vol.spacing_mm[0])
    n = int(round(slab_mm / dz)) if slab_mm > 0 else 1
    if n <= 1 or dz >= 0.5 * slab_mm:
        return vol, lesion_mask, np.arange(nz)
    groups = [np.arange(s, min(s + n, nz)) for s in range(0, nz, n)]
    if len(groups) > 1 and len(groups[-1]) < (n + 1) // 2:  # a short top slab joins the last
        groups[-2] = np.concatenate([groups[-2], groups[-1]])
        groups.pop()
    hu = np.stack([vol.hu[g].mean(0, dtype=np.float32) for g in groups]).astype(np.float32)
    mask = None
    if lesion_mask is not None:
        mask = np.stack([lesion_mask[g].any(0) for g in groups])
    src = np.array([int(g[len(g) // 2]) for g in groups])
    out = HUVolume(hu=hu, spacing_mm=(dz * n, vol.spacing_mm[1], vol.spacing_mm[2]),
                   sop_instance_uids=[vol.sop_instance_uids[k] for k in src],
                   series_instance_uid=vol.series_instance_uid, affine_zyx=vol.affine_zyx)
    return out, mask, src


def prepare_volume(vol: HUVolume, options: PreprocessOptions = DEFAULT_OPTIONS,
                   lesion_mask: np.ndarray | None = None
                   ) -> tuple[HUVolume, np.ndarray | None, np.ndarray]:
    """Apply the volume-level steps of ``options`` (tilt correction, slabs); also returns,
    per resulting slice, the index of the input slice it stands for."""
    src = np.arange(vol.hu.shape[0])
    if options.correct_tilt and vol.affine_zyx is not None:
        vol, lesion_mask, s1 = correct_tilt(vol, lesion_mask)
        src = src[s1]
    if options.slab_mm > 0:
        vol, lesion_mask, s2 = thin_to_slabs(vol, options.slab_mm, lesion_mask)
        src = src[s2]
    return vol, lesion_mask, src


def _head_yaw(hu: np.ndarray, spacing_yx: tuple[float, float]) -> float:
    """In-plane angle (radians) of the head's long (front-back) axis from the image columns'
    direction, from the second moments of the largest head blob in the axial projection."""
    proj = (hu > -300.0).any(axis=0)
    proj = ndi.binary_opening(proj, iterations=max(2, round(3.0 / min(spacing_yx))))
    lab, n = ndi.label(proj)
    if n == 0:
        return 0.0
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    ys, xs = np.nonzero(lab == int(np.argmax(sizes)))
    y = (ys - ys.mean()) * spacing_yx[0]
    x = (xs - xs.mean()) * spacing_yx[1]
    cov = np.cov(np.stack([y, x]))
    w, v = np.linalg.eigh(cov)
    major = v[:, int(np.argmax(w))]  # (y, x)
    if major[0] < 0:
        major = -major
    ang = float(np.arctan2(major[1], major[0]))
    # a nearly round head has no reliable axis; a big angle is not a head turn
    if w.max() < 1.1 * w.min() or abs(ang) > np.radians(30):
        return 0.0
    return ang


def brain_noise_hu(hu: np.ndarray, brain: np.ndarray) -> float:
    """Robust SD (HU) of what a 1-pixel Gaussian blur removes from soft brain tissue: the
    fine-grained noise a reconstruction kernel and slice thickness leave at model resolution."""
    r = hu - ndi.gaussian_filter(hu, (0, 1.0, 1.0))
    v = r[brain & (hu > 0.0) & (hu < 60.0)]
    if v.size < 100:
        return 0.0
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def _limit_noise(hu: np.ndarray, brain: np.ndarray, max_hu: float) -> np.ndarray:
    """The slices smoothed in-plane with the smallest Gaussian that brings
    ``brain_noise_hu`` to ``max_hu`` or below (unchanged when already there)."""
    if brain_noise_hu(hu, brain) <= max_hu:
        return hu
    out = hu
    for sigma in (0.4, 0.55, 0.7, 0.85, 1.0, 1.2, 1.4):
        out = ndi.gaussian_filter(hu, (0, sigma, sigma)).astype(np.float32)
        if brain_noise_hu(out, brain) <= max_hu:
            break
    return out


# ----------------------------------------------------------------------------- model input


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Average k x k in-plane blocks (anti-aliasing before a big downsample, and cheap)."""
    if k <= 1:
        return a
    z, y, x = a.shape
    y2, x2 = (y // k) * k, (x // k) * k
    return a[:, :y2, :x2].reshape(z, y2 // k, k, x2 // k, k).mean(axis=(2, 4), dtype=np.float32)


def _head_centre(hu: np.ndarray, spacing_yx: tuple[float, float]) -> tuple[float, float]:
    """Centre (mm from pixel 0,0) of the largest head blob in the axial projection.

    Why the projection: one centre for the whole series keeps slices aligned with each other,
    and the largest blob ignores the table and head holder.
    """
    proj = (hu > -300.0).any(axis=0)
    # a 3 mm opening detaches the head holder and table from the head
    proj = ndi.binary_opening(proj, iterations=max(2, round(3.0 / min(spacing_yx))))
    lab, n = ndi.label(proj)
    if n == 0:
        raise PreprocessError("model input: no head found (nothing above -300 HU)")
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    cy, cx = ndi.center_of_mass(lab == int(np.argmax(sizes)))
    return float(cy) * spacing_yx[0], float(cx) * spacing_yx[1]


_PLANE = np.zeros((3, 3, 3), dtype=bool)
_PLANE[1] = ndi.generate_binary_structure(2, 1)


def _plane_disk(r: int) -> np.ndarray:
    """In-plane disk footprint of radius ``r`` pixels for 3D (Z, Y, X) filters."""
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx <= r * r)[None]


def _brain_mask(hu: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Skull-stripped brain: soft tissue that never touches air or fat, the largest 3D blob of
    it, holes filled, eroded a little.

    Why these rules: scalp and face are soft tissue too, and thick slices blur the skull at the
    vertex, so "inside the bone ring" alone leaks; but scalp, face and globes always touch air
    or fat while the brain never does (bone and CSF lie between). 3D connectivity then drops
    the globes and other islands, while keeping every piece of brain at the skull base
    (temporal lobes, cerebellum) that connects through the brainstem. Distances are in mm,
    so the rules hold at any model resolution.
    """

    def px(mm: float) -> int:
        return max(1, round(mm / pixel_mm))

    ring_px = max(2, round(4.5 / pixel_mm))
    bone = hu > 150.0
    soft = (hu > -30.0) & (hu < 150.0)
    soft &= ~ndi.binary_dilation(bone, structure=_PLANE, iterations=px(1.5))
    it = px(2.5)
    soft = ndi.binary_opening(soft, structure=_PLANE, iterations=it)
    out = np.zeros(hu.shape, dtype=bool)
    # air and fat: scalp, face, globes and neck touch them, the brain does not (bone between)
    near_low = ndi.binary_dilation(hu < -40.0, structure=_PLANE, iterations=px(3.0))
    lab, n = ndi.label(soft, structure=_PLANE)
    if n == 0:
        return out
    area = np.bincount(lab.ravel(), minlength=n + 1)
    contact = np.bincount(lab[near_low].ravel(), minlength=n + 1)
    # ring-based: what fraction of the tissue around each blob is air or fat
    grown = ndi.grey_dilation(lab, footprint=_plane_disk(ring_px))
    ring = (grown > 0) & (lab == 0)
    ring_n = np.bincount(grown[ring].ravel(), minlength=n + 1)
    ring_low = np.bincount(grown[ring & (hu < -40.0)].ravel(), minlength=n + 1)
    low_frac = ring_low / np.maximum(ring_n, 1)
    ok = (contact <= np.maximum(3, 0.1 * area)) & (low_frac <= 0.22) & (area >= 4)
    ok[0] = False
    cand = ok[lab]
    # a one-voxel 3D erosion cuts thin contacts (face under the frontal lobe, thick slices),
    # then the largest blob is grown back inside the candidates
    core = ndi.binary_erosion(cand)
    lab3, n3 = ndi.label(core)
    if n3 == 0:
        lab3, n3 = ndi.label(cand)
        if n3 == 0:
            return out
    sizes = np.bincount(lab3.ravel())
    sizes[0] = 0
    comp = ndi.binary_dilation(lab3 == int(np.argmax(sizes)), iterations=2, mask=cand)
    for z in np.flatnonzero(comp.any(axis=(1, 2))):
        out[z] = ndi.binary_fill_holes(comp[z])
    # holes filled with bone (clinoids, petrous tips) are not brain; calcifications are
    blab, nb = ndi.label(bone & out, structure=_PLANE)
    if nb:
        barea = np.bincount(blab.ravel())
        barea[0] = 0
        out &= ~(barea > max(6, round(20 / pixel_mm**2)))[blab]
    # give back the rim the bone dilation took where it is not bone (thin subdural and
    # epidural collections live there), then erode a little so no partial-volume skull is left
    back = ndi.binary_dilation(
        out, structure=_PLANE, iterations=px(3.0), mask=(hu > -30.0) & (hu < 120.0)
    )
    return ndi.binary_erosion(back, structure=_PLANE, iterations=px(1.5))


def model_inputs(
    vol: HUVolume,
    *,
    size: int = 128,
    fov_mm: float = 200.0,
    min_brain_fraction: float = 0.05,
    lesion_mask: np.ndarray | None = None,
    window: tuple[float, float] = (0.0, 80.0),
    options: PreprocessOptions | None = None,
) -> ModelInput:
    """HU volume -> (N, size, size) brain-windowed, head-centred slices with brain masks.

    The in-plane grid is ``fov_mm / size`` mm per pixel around the head centre, so every
    scanner's field of view gives the model the same anatomy scale. Slices whose brain covers
    less than ``min_brain_fraction`` of the frame (vertex, skull base) are dropped.
    ``options`` (default ``DEFAULT_OPTIONS``) switches the site-independent steps; whatever
    they do, ``slice_index`` names slices of ``vol`` as given.
    """
    opts = DEFAULT_OPTIONS if options is None else options
    if lesion_mask is not None and lesion_mask.shape != vol.hu.shape:
        raise PreprocessError(
            f"model input: lesion mask shape {lesion_mask.shape} != volume {vol.hu.shape}"
        )
    vol, lesion_mask, src_index = prepare_volume(vol, opts, lesion_mask)
    hu = vol.hu
    if hu.ndim != 3 or hu.shape[0] < 1:
        raise PreprocessError(f"model input: expected a (Z, Y, X) volume, got shape {hu.shape}")
    _, sy, sx = (float(s) for s in vol.spacing_mm)
    px = fov_mm / size
    cy, cx = _head_centre(hu, (sy, sx))
    yaw = _head_yaw(hu, (sy, sx)) if opts.align_yaw else 0.0

    # cheap anti-aliasing: integer block mean to roughly the target spacing, then linear
    k = max(1, int(np.floor(px / max(sy, sx) + 1e-6)))
    small = _block_mean(hu, k)
    lsmall = _block_mean(lesion_mask.astype(np.float32), k) if lesion_mask is not None else None
    by, bx = sy * k, sx * k
    grid = (np.arange(size, dtype=np.float64) - (size - 1) / 2.0) * px
    # block j covers original pixels [j*k, j*k+k): its centre is at (j*k + (k-1)/2) * s
    nz = hu.shape[0]
    zc = np.broadcast_to(np.arange(nz, dtype=np.float64)[:, None, None], (nz, size, size))
    if yaw:  # model row r runs along the head's front-back axis
        gy, gx = grid[:, None], grid[None, :]
        cs, sn = np.cos(yaw), np.sin(yaw)
        iy2 = (cy + cs * gy - sn * gx) / by - (k - 1) / (2.0 * k)
        ix2 = (cx + sn * gy + cs * gx) / bx - (k - 1) / (2.0 * k)
        yc = np.broadcast_to(iy2[None], (nz, size, size))
        xc = np.broadcast_to(ix2[None], (nz, size, size))
    else:
        iy = (cy + grid) / by - (k - 1) / (2.0 * k)
        ix = (cx + grid) / bx - (k - 1) / (2.0 * k)
        yc = np.broadcast_to(iy[None, :, None], (nz, size, size))
        xc = np.broadcast_to(ix[None, None, :], (nz, size, size))
    coords = np.stack([zc, yc, xc])
    hu_m = ndi.map_coordinates(
        small, coords, order=1, mode="constant", cval=-1000.0, prefilter=False
    ).astype(np.float32)
    brain = _brain_mask(hu_m, px)
    if opts.max_noise_hu > 0:
        hu_m = _limit_noise(hu_m, brain, opts.max_noise_hu)
    frac = brain.mean(axis=(1, 2))
    keep = np.flatnonzero(frac >= min_brain_fraction)
    if keep.size == 0:
        raise PreprocessError(
            f"model input: no slice has at least {min_brain_fraction:.0%} brain "
            f"(largest {frac.max():.1%}); not a head CT or the head is outside the field of view"
        )
    lo, hi = window
    x = np.clip((hu_m[keep] - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    lesion = None
    if lsmall is not None:
        lm = ndi.map_coordinates(
            lsmall, coords[:, keep], order=1, mode="constant", cval=0.0, prefilter=False
        )
        lesion = lm >= 0.5
    return ModelInput(
        x=x,
        brain=brain[keep],
        slice_index=src_index[keep].astype(int),
        lesion=lesion,
        hu=hu_m[keep],
        pixel_mm=px,
        centre_yx_mm=(cy, cx),
        yaw_rad=float(yaw),
    )
