"""Synthetic non-contrast head CT volumes with voxel-exact lesion masks.

Why this exists: no real patient data may be downloaded here, yet the detector, the pipeline and
the demo all need head CTs whose ground truth is known. We build them from the MNI152 2009a
grey/white-matter and T1 maps that ship inside nilearn (1 mm, no download), turn tissue fractions
into Hounsfield units, add skull, scalp and normal variants, optionally insert one lesion, and
resample through a random head pose, head shape and smooth elastic deformation onto a scanner
grid with a realistic slice thickness, pixel spacing, partial-volume blur and quantum noise.

Normal variation is deliberately rich (ventricle and sulcal size, calcified choroid plexus and
pineal, falx, tissue HU, noise, slice thickness, field of view): a detector that flags every
calcification or every big ventricle is useless, so those must occur in normals too.

Geometry conventions (match a DICOM axial head CT with identity orientation, LPS):
arrays are ``(Z, Y, X)``; Z runs inferior -> superior, Y (rows) anterior -> posterior, X (columns)
patient right -> left. The internal template uses the same axis order at 1 mm.

This module is pure numpy/scipy/nibabel: it must not import pydicom, SQLAlchemy or the service.
It is for development and demo only; a site trains on its own normal studies.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from triage_model.sites import SiteProfile, get_site

log = logging.getLogger(__name__)

LESION_FAMILIES: tuple[str, ...] = (
    "atrophy",
    "intraparenchymal_haemorrhage",
    "subdural_haematoma",
    "epidural_haematoma",
    "subarachnoid_haemorrhage",
    "intraventricular_haemorrhage",
    "territorial_ischaemia",
    "lacunar_ischaemia",
    "tumour",
    "cavernoma",
    "aneurysm",
)

#: Probability that ``make_case`` draws a subtle presentation when ``subtle`` is None.
SUBTLE_PROBABILITY = 0.3

_VERSION = 1


@dataclass
class SynthCase:
    """One synthetic head CT: HU volume, lesion mask and the truth about how it was made."""

    hu: np.ndarray  # (Z, Y, X) float32 Hounsfield units
    spacing_mm: tuple[float, float, float]  # (z, y, x)
    lesion_mask: np.ndarray  # (Z, Y, X) bool, all False for normals
    label: str  # "normal" or one of LESION_FAMILIES
    subtle: bool
    seed: int
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Template (loaded once per process)
# --------------------------------------------------------------------------------------------


@dataclass
class _Template:
    """Static anatomy at 1 mm in (Z, Y, X) LPS order, cropped to the head with padding."""

    gm: np.ndarray  # float32 grey-matter fraction
    wm: np.ndarray  # float32 white-matter fraction
    icv: np.ndarray  # bool intracranial space (brain + thin CSF layer)
    vent: np.ndarray  # bool lateral/third/fourth ventricles
    vent_sd: np.ndarray  # float32 signed distance to ventricle surface (mm, <0 inside)
    sulc: np.ndarray  # float32 smoothed non-ventricular CSF fraction (sulcal opening potential)
    depth: np.ndarray  # float32 distance inside the ICV from its surface (mm)
    d_skull: np.ndarray  # float32 distance outside the cranial envelope (mm)
    # the head outside the cranial cavity, as flat indices sorted by class (see _CLS_*) so each
    # class is one contiguous run; per outer voxel: distance outside the cranial envelope,
    # relative skull thickness (thin temporal squama, thick occiput), extra soft tissue
    # (temporalis, mm), depth below the skin (face), smooth unit-variance texture
    outer: np.ndarray  # int32
    outer_cls_start: np.ndarray  # int64 (n_classes + 1,) run boundaries in ``outer``
    outer_d: np.ndarray  # float32
    outer_t: np.ndarray  # float32
    outer_se: np.ndarray  # float32
    outer_depth: np.ndarray  # float32
    texture: np.ndarray  # float32
    centre: np.ndarray  # (3,) float64 index of the head centre (z, y, x)
    mni_origin: np.ndarray  # (3,) index of MNI (0,0,0) in this array (z, y, x)


# classes of the voxels outside the cranial cavity
_CLS_SHELL = 0  # skull vault / scalp / air by distance from the cranial envelope
_CLS_BASE = 1  # skull-base bone (petrous, clivus, sphenoid, orbital roofs)
_CLS_FACE = 2  # facial soft tissue
_CLS_AIR = 3  # paranasal sinus / nasal cavity / mastoid air
_CLS_ORBIT_FAT = 4
_CLS_GLOBE = 5
_CLS_LENS = 6
_CLS_THIN_BONE = 7  # sinus and orbit walls, nasal septum
_N_CLS = 8

#: padding (mm) below/above, anterior/posterior, right/left of the brain bounding box
_PAD = ((16, 24), (48, 24), (24, 24))


def _mni_dir() -> Path:
    import nilearn  # local import: nilearn is heavy and only its data files are needed

    return Path(nilearn.__file__).parent / "datasets" / "data"


def _load_mni(kind: str) -> np.ndarray:
    import nibabel as nib

    path = _mni_dir() / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32) / 255.0  # type: ignore[attr-defined]
    # nibabel gives (x, y, z) in RAS; we want (z, y, x) with y anterior->posterior and
    # x right->left (LPS), i.e. flip both in-plane axes.
    return np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])


def _edt(mask: np.ndarray) -> np.ndarray:
    return ndi.distance_transform_edt(mask).astype(np.float32)


def _template_key() -> str:
    """Hash of the code that builds the template, so an edited builder never reads a stale
    cache written by an older version (other processes share the cache folder)."""
    import hashlib
    import inspect

    src = "".join(
        inspect.getsource(f) for f in (_build_template, _edt, _ellipsoid_r, _smooth_noise)
    )
    src += repr((_PAD, _VERSION))
    for kind in ("t1", "gm", "wm"):
        p = _mni_dir() / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
        src += f"{kind}:{p.stat().st_size}"
    return hashlib.sha1(src.encode()).hexdigest()[:12]


def _cache_path() -> Path | None:
    """``$TRIAGE_SYNTH_CACHE`` or ``~/.cache/triage-agent``; set the variable to ``off`` to
    disable the on-disk cache."""
    root = os.environ.get("TRIAGE_SYNTH_CACHE")
    if root and root.lower() in ("off", "0", "none", "false"):
        return None
    base = Path(root) if root else Path.home() / ".cache" / "triage-agent"
    return base / f"synth-template-{_template_key()}.npz"


@lru_cache(maxsize=1)
def _template() -> _Template:
    """The static anatomy, from the on-disk cache when possible (building takes ~15 s)."""
    path = _cache_path()
    if path is not None and path.exists():
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
            conv = {
                k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in arrays.items()
            }
            return _Template(**conv)
        except Exception as e:  # noqa: BLE001 - a broken cache is rebuilt
            log.warning("rebuilding synth template cache (%s)", e)
    tpl = _build_template()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
            small = {}
            for k, v in ((f.name, getattr(tpl, f.name)) for f in fields(tpl)):
                if v.dtype == np.float32 and k not in ("centre", "mni_origin"):
                    small[k] = v.astype(np.float16)
                else:
                    small[k] = v
            np.savez(tmp, **small)
            os.replace(tmp, path)
            for old in path.parent.glob("synth-template-*.npz"):  # older builders' caches
                if old != path and ".tmp." not in old.name:
                    old.unlink(missing_ok=True)
        except OSError as e:
            log.info("synth template not cached (%s)", e)
    # round-trip through float16 so cached and fresh templates give identical cases
    for k, v in ((f.name, getattr(tpl, f.name)) for f in fields(tpl)):
        if v.dtype == np.float32 and k not in ("centre", "mni_origin"):
            setattr(tpl, k, v.astype(np.float16).astype(np.float32))
    return tpl


def _ellipsoid_r(
    shape: tuple[int, ...], centre: np.ndarray, radii: tuple[float, float, float]
) -> np.ndarray:
    """Normalised ellipsoid radius over the grid (<1 inside); radii in (z, y, x) mm."""
    z = (np.arange(shape[0], dtype=np.float32)[:, None, None] - centre[0]) / radii[0]
    y = (np.arange(shape[1], dtype=np.float32)[None, :, None] - centre[1]) / radii[1]
    x = (np.arange(shape[2], dtype=np.float32)[None, None, :] - centre[2]) / radii[2]
    return np.sqrt(z * z + y * y + x * x)


def _build_template() -> _Template:
    t0 = time.perf_counter()
    t1 = _load_mni("t1")
    gm = _load_mni("gm")
    wm = _load_mni("wm")
    brain = (t1 > 0.02) | (gm + wm > 0.1)
    # crop to the brain bounding box plus padding for skull, scalp and face
    idx = np.argwhere(brain)
    lo = idx.min(0) - np.array([p[0] for p in _PAD])
    hi = idx.max(0) + np.array([p[1] for p in _PAD]) + 1
    shape = tuple(int(v) for v in hi - lo)
    pad_lo = np.maximum(-lo, 0)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(hi, brain.shape)
    sl_src = tuple(slice(int(a_), int(b_)) for a_, b_ in zip(src_lo, src_hi, strict=True))
    sl_dst = tuple(
        slice(int(p), int(p + (b_ - a_))) for p, a_, b_ in zip(pad_lo, src_lo, src_hi, strict=True)
    )

    def crop(a: np.ndarray, fill: float | bool = 0) -> np.ndarray:
        out = np.full(shape, fill, dtype=a.dtype)
        out[sl_dst] = a[sl_src]
        return out

    brain = crop(brain, False)
    gm = crop(gm)
    wm = crop(wm)
    s = gm + wm
    over = s > 1.0
    gm[over] /= s[over]
    wm[over] /= s[over]
    gm[~brain] = 0
    wm[~brain] = 0
    csf_in_brain = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    # MNI (0,0,0) is voxel (72, 134, 98) in RAS (z, y, x); after the in-plane flips it is
    # (72, 232 - 134, 196 - 98), then shifted by the crop.
    mni_origin = np.array([72 - lo[0], (232 - 134) - lo[1], (196 - 98) - lo[2]], dtype=float)

    def mni(x: float, y: float, z: float) -> np.ndarray:
        return np.array([mni_origin[0] + z, mni_origin[1] - y, mni_origin[2] - x])

    def ell(xyz: tuple[float, float, float], rxyz: tuple[float, float, float]) -> np.ndarray:
        return _ellipsoid_r(shape, mni(*xyz), (rxyz[2], rxyz[1], rxyz[0]))

    # intracranial volume: brain + thin subarachnoid CSF
    # (a 6 mm closing keeps the basal cisterns and fissures as CSF instead of skull base)
    d_out = _edt(~brain)
    icv = (d_out <= 1.5) | (_edt(d_out <= 6.0) > 6.0)
    depth = _edt(icv)

    # ventricles: deep, central CSF
    vent_c = (csf_in_brain > 0.55) & (depth > 10)
    xx = np.arange(shape[2])[None, None, :]
    vent_c &= np.abs(xx - mni_origin[2]) < 32
    # on the midline only the third ventricle is ventricle; the rest is fissure and cistern
    zi = np.arange(shape[0], dtype=np.float32)[:, None, None]
    yi = np.arange(shape[1], dtype=np.float32)[None, :, None]
    y_mni = mni_origin[1] - yi
    z_mni = zi - mni_origin[0]
    third = (y_mni > -28) & (y_mni < 4) & (z_mni > -12) & (z_mni < 14)
    vent_c &= ~((np.abs(xx - mni_origin[2]) < 3.5) & ~third)
    lab, n = ndi.label(vent_c)
    sizes = ndi.sum(vent_c, lab, index=np.arange(1, n + 1))
    vent = np.isin(lab, np.flatnonzero(sizes >= 150) + 1)
    vent = ndi.binary_closing(vent, iterations=1) & brain
    # signed distance to the ventricles, exact within 30 mm of them (all that is ever used)
    vbox = _box(
        (np.argwhere(vent).min(0) + np.argwhere(vent).max(0)) / 2.0,
        (np.argwhere(vent).max(0) - np.argwhere(vent).min(0)) / 2.0 + 30.0,
        shape,
    )
    vent_sd = np.full(shape, 30.0, dtype=np.float32)
    vent_sd[vbox] = np.minimum(_edt(~vent[vbox]) - _edt(vent[vbox]), 30.0)
    sulc = ndi.gaussian_filter(csf_in_brain * (~vent), 1.0).astype(np.float32)

    # cranial envelope: the ICV closed with a 14 mm ball, holes filled slice by slice. The gaps
    # it fills between temporal lobes, brainstem and cerebellum become skull-base bone.
    r = 14.0
    env = _edt(_edt(~icv) <= r) > r
    env |= icv
    for k in range(shape[0]):
        env[k] = ndi.binary_fill_holes(env[k])
    # below the brain (foramen magnum level) the skull base continues: repeat the lowest envelope
    zb = int(np.flatnonzero(icv.any(axis=(1, 2)))[0])
    env[:zb] = env[zb]
    d_skull = _edt(~env)

    c = np.array(np.argwhere(icv).mean(0), dtype=float)
    lat = np.abs(xx - c[2]) / 70.0
    post = (yi - c[1]) / 90.0
    low = np.clip((mni_origin[0] + 30 - zi) / 40.0, 0, 1)
    t_unit = (1.0 - 0.4 * np.clip(lat * low * 2.5, 0, 1) + 0.25 * np.clip(post, 0, 1)).astype(
        np.float32
    )
    scalp_extra = (
        7.0 * np.clip(lat * 2 - 1.1, 0, 1) * np.clip((mni_origin[0] + 45 - zi) / 30.0, 0, 1)
    ).astype(np.float32)
    t_unit = np.broadcast_to(t_unit, shape)
    scalp_extra = np.broadcast_to(scalp_extra, shape)

    # ---- face and skull base (MNI mm; crude but recognisable to a radiologist)
    cls = np.full(shape, 255, dtype=np.uint8)  # 255 = not part of the outer head
    shell = (d_skull > 0) & (d_skull <= 26.0)  # thickest skull + scalp + temporalis
    cls[shell] = _CLS_SHELL
    cls[env & ~icv] = _CLS_BASE
    face = (ell((0, 38, -52), (62, 66, 40)) < 1.0) & (zi < mni_origin[0] - 8)
    face &= yi < mni_origin[1] - 8  # anterior to the sella
    # deep face (nasopharynx, pterygoid and masseter muscles, temporal fossa): close the gap
    # between the facial mask and the skull base slice by slice
    z_face = int(mni_origin[0] - 14)
    for k in range(0, max(z_face, 0)):
        sl = face[k] | (d_skull[k] <= 8.0)
        if not sl.any() or not face[k].any():
            continue
        filled = _edt(_edt(~sl) <= 30.0) > 30.0
        face[k] |= ndi.binary_fill_holes(filled | sl) & ~sl
    face &= ~env
    cls[face] = _CLS_FACE
    texture = _smooth_noise(np.random.default_rng(1234), shape, 1.2)
    walls = np.zeros(shape, dtype=bool)
    # (MNI centre x, y, z), (radii x, y, z), honeycomb
    cavities: list[tuple[tuple[float, float, float], tuple[float, float, float], bool]] = [
        ((0, 50, -42), (12, 24, 14), True),  # nasal cavity / ethmoid cells
        ((0, 12, -30), (12, 11, 10), False),  # sphenoid sinus
        ((-28, 42, -66), (14, 18, 16), False),  # maxillary sinus R
        ((28, 42, -66), (14, 18, 16), False),  # maxillary sinus L
        ((-46, -26, -40), (10, 12, 12), True),  # mastoid R
        ((46, -26, -40), (10, 12, 12), True),  # mastoid L
        ((0, 77, 2), (13, 4, 9), False),  # frontal sinus
    ]
    air = np.zeros(shape, dtype=bool)
    for cxyz, radii, honey in cavities:
        rr = ell(cxyz, radii)
        inner = rr < 1.0
        if honey:
            inner &= np.abs(texture) < 0.9
        walls |= (rr < 1.0 + 1.6 / min(radii)) & ~inner
        air |= inner
    # nasal septum
    septum = (np.abs(xx - mni_origin[2]) < 0.8) & (ell((0, 50, -45), (12, 26, 18)) < 1.0)
    # orbits: cone-ish fat with the globe and lens, bony walls around
    for side in (-1.0, 1.0):
        orb = ell((side * 31, 44, -40), (17, 26, 17))
        globe = ell((side * 32, 58, -40), (11.5, 11.5, 11.5))
        lens = ell((side * 32, 68.5, -40), (4.5, 2.0, 4.5))
        wall = (orb < 1.0 + 1.8 / 17) & (orb >= 1.0) & (yi > mni_origin[1] - 58)
        cls[wall & (cls != 255) | wall & face] = _CLS_THIN_BONE
        cls[(orb < 1.0) & ~icv] = _CLS_ORBIT_FAT
        cls[(globe < 1.0) & ~icv] = _CLS_GLOBE
        cls[(lens < 1.0) & ~icv] = _CLS_LENS
        air &= orb >= 1.0
        walls &= orb >= 1.05
    walls &= ~icv
    air &= ~icv
    cls[walls & ((cls != 255) | face)] = _CLS_THIN_BONE
    cls[air & (cls != 255)] = _CLS_AIR
    cls[septum & ~air & (cls != 255)] = _CLS_THIN_BONE
    cls[icv] = 255
    head = (cls != 255) & ((d_skull <= 10.0) | (cls != _CLS_SHELL))
    face_depth = _edt(head | icv)
    outer = np.flatnonzero(cls != 255)
    ocls = cls.ravel()[outer]
    order = np.argsort(ocls, kind="stable")
    outer = outer[order].astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(np.bincount(ocls, minlength=_N_CLS))])

    log.info("synth template built in %.1f s (shape %s)", time.perf_counter() - t0, shape)
    return _Template(
        gm=gm,
        wm=wm,
        icv=icv,
        vent=vent,
        vent_sd=vent_sd.astype(np.float32),
        sulc=sulc,
        depth=depth,
        d_skull=d_skull,
        outer=outer,
        outer_cls_start=starts.astype(np.int64),
        outer_d=d_skull.ravel()[outer],
        outer_t=np.ascontiguousarray(t_unit).ravel()[outer],
        outer_se=np.ascontiguousarray(scalp_extra).ravel()[outer],
        outer_depth=face_depth.ravel()[outer],
        texture=texture.ravel()[outer].astype(np.float32),
        centre=c,
        mni_origin=mni_origin,
    )


def _mni_to_index(tpl: _Template, x: float, y: float, z: float) -> np.ndarray:
    """MNI (RAS mm) -> template (z, y, x) float index."""
    return np.array([tpl.mni_origin[0] + z, tpl.mni_origin[1] - y, tpl.mni_origin[2] - x])


# --------------------------------------------------------------------------------------------
# Per-case anatomy
# --------------------------------------------------------------------------------------------


@dataclass
class _Anatomy:
    """Per-case tissue fields in template space, modified by normal variation and lesions."""

    gm: np.ndarray
    wm: np.ndarray
    csf_extra: np.ndarray  # extra CSF (ventricle growth, sulcal opening), float32 [0,1]
    overlays: list[tuple[tuple[slice, ...], np.ndarray, np.ndarray | float]] = field(
        default_factory=list
    )  # (box, alpha, hu) blended over the brain after composition
    lesion: np.ndarray | None = None  # float32 fraction in template space
    params: dict = field(default_factory=dict)


def _box(centre: np.ndarray, half: np.ndarray | float, shape: tuple[int, ...]) -> tuple[slice, ...]:
    half = np.broadcast_to(np.asarray(half, dtype=float), (3,))
    lo = np.maximum(np.floor(centre - half).astype(int), 0)
    hi = np.minimum(np.ceil(centre + half).astype(int) + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _box_coords(box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None, None]
    y = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :, None]
    x = np.arange(box[2].start, box[2].stop, dtype=np.float32)[None, None, :]
    return z, y, x


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (for lobulated lesion borders, textures)."""
    n = rng.standard_normal(shape).astype(np.float32)
    n = ndi.gaussian_filter(n, sigma)
    return n / max(float(n.std()), 1e-6)


def _blob(
    rng: np.random.Generator,
    box: tuple[slice, ...],
    centre: np.ndarray,
    radii: np.ndarray,
    irregularity: float = 0.25,
    edge: float = 1.0,
) -> np.ndarray:
    """Soft ellipsoid with a lobulated border, as an alpha map over ``box``."""
    z, y, x = _box_coords(box)
    r = np.sqrt(
        ((z - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((x - centre[2]) / radii[2]) ** 2
    )
    shape = tuple(s.stop - s.start for s in box)
    if irregularity > 0:
        wobble = irregularity * _smooth_noise(rng, shape, max(2.0, float(radii.min()) / 2))
        r = r * np.clip(1.0 + wobble, 0.6, 1.6)
    mean_r = float(np.mean(radii))
    return np.clip((1.0 - r) * mean_r / edge + 0.5, 0.0, 1.0).astype(np.float32)


def _push(anat: _Anatomy, tpl: _Template, centre: np.ndarray, radius: float, amp: float) -> None:
    """Mass effect: push the brain radially away from ``centre`` (amp mm at the lesion).

    The displacement fades with distance and towards the inner table, so the skull stays put
    and the brain next to it is compressed (sulcal effacement, midline shift for big masses).
    """
    if amp <= 0:
        return
    box = _box(centre, radius * 2.6, tpl.gm.shape)
    z, y, x = _box_coords(box)
    dz, dy, dx = z - centre[0], y - centre[1], x - centre[2]
    r = np.sqrt(dz * dz + dy * dy + dx * dx) + 1e-3
    mag = amp * np.exp(-((r / (1.3 * radius)) ** 2)) * np.minimum(1.0, r / radius)
    taper = np.clip(tpl.depth[box] / 6.0, 0.0, 1.0)
    mag = mag * taper
    sel = mag > 0.05  # only voxels that actually move (a ball, not the whole box)
    if not sel.any():
        return
    shape = mag.shape
    scale = (mag / r)[sel]
    pts = np.stack(
        [
            (np.broadcast_to(z, shape)[sel] - box[0].start)
            - scale * np.broadcast_to(dz, shape)[sel],
            (np.broadcast_to(y, shape)[sel] - box[1].start)
            - scale * np.broadcast_to(dy, shape)[sel],
            (np.broadcast_to(x, shape)[sel] - box[2].start)
            - scale * np.broadcast_to(dx, shape)[sel],
        ]
    )
    for name in ("gm", "wm", "csf_extra"):
        sub = getattr(anat, name)[box]  # a view: writing it moves the tissue in place
        sub[sel] = ndi.map_coordinates(sub, pts, order=1, mode="nearest")


def _sample_point(
    rng: np.random.Generator, tpl: _Template, cond: np.ndarray, side: int | None = None
) -> np.ndarray:
    """Random template index where ``cond`` holds (optionally on one side: +1 left, -1 right)."""
    if side is not None:
        x = np.arange(cond.shape[2])[None, None, :]
        cond = cond & ((x - tpl.mni_origin[2]) * side > 3)
    idx = np.flatnonzero(cond)
    if idx.size == 0:
        raise RuntimeError("no candidate location for lesion")
    return np.array(np.unravel_index(idx[rng.integers(idx.size)], cond.shape), dtype=float)


# --------------------------------------------------------------------------------------------
# Lesions (each adds overlays / modifies tissue and sets anat.lesion)
# --------------------------------------------------------------------------------------------


def _add_lesion_alpha(anat: _Anatomy, box: tuple[slice, ...], alpha: np.ndarray) -> None:
    if anat.lesion is None:
        anat.lesion = np.zeros(anat.gm.shape, dtype=np.float32)
    np.maximum(anat.lesion[box], alpha, out=anat.lesion[box])


def _lesion_atrophy(anat: _Anatomy, tpl: _Template, rng: np.random.Generator, subtle: bool) -> None:
    grow = rng.uniform(1.2, 2.0) if subtle else rng.uniform(2.0, 3.5)
    sulc = rng.uniform(0.05, 0.08) if subtle else rng.uniform(0.08, 0.13)
    before = anat.csf_extra.copy()
    _apply_csf_variation(
        anat, tpl, anat.params["vent_grow"] + grow, anat.params["sulc_open"] + sulc
    )
    gained = anat.csf_extra - before
    anat.lesion = np.clip((gained - 0.2) / 0.3, 0, 1).astype(np.float32)
    anat.params.update(lesion_vent_grow_mm=grow, lesion_sulc_open=sulc)


def _lesion_iph(anat: _Anatomy, tpl: _Template, rng: np.random.Generator, subtle: bool) -> None:
    deep = rng.random() < 0.6
    if deep:  # basal ganglia / thalamus: hypertensive bleed
        cond = (tpl.gm > 0.5) & (tpl.depth > 28)
    else:  # lobar
        cond = (tpl.wm > 0.6) & (tpl.depth > 10) & (tpl.depth < 22)
    c = _sample_point(rng, tpl, cond, side=int(rng.choice([-1, 1])))
    rad = rng.uniform(3.0, 5.0) if subtle else rng.uniform(8.0, 20.0)
    radii = rad * rng.uniform(0.7, 1.3, 3)
    hu = rng.uniform(52, 60) if subtle else rng.uniform(60, 85)
    if not subtle:
        _push(anat, tpl, c, rad, rad * rng.uniform(0.25, 0.45))
    box = _box(c, radii.max() * 2.2, tpl.gm.shape)
    alpha = _blob(rng, box, c, radii, 0.2)
    oed = _blob(rng, box, c, radii + rng.uniform(2, 5), 0.3) * 0.5
    anat.overlays.append((box, oed, 15.0))
    anat.overlays.append((box, alpha, hu))
    _add_lesion_alpha(anat, box, alpha)
    anat.params.update(lesion_centre=c.tolist(), lesion_radius_mm=rad, lesion_hu=hu, deep=deep)


def _extra_axial(
    anat: _Anatomy,
    tpl: _Template,
    rng: np.random.Generator,
    *,
    thickness: float,
    extent: float,
    hu: np.ndarray | float,
    lens: bool,
) -> np.ndarray:
    """Collection between inner table and brain: crescent (subdural) or lens (epidural)."""
    side = int(rng.choice([-1, 1]))
    # a point on the convexity: ICV surface voxel, lateral, upper two thirds
    x = np.arange(tpl.icv.shape[2])[None, None, :]
    z = np.arange(tpl.icv.shape[0])[:, None, None]
    surf = (tpl.depth > 0) & (tpl.depth < 1.5)
    zc = tpl.mni_origin[0]
    lo_z = zc + (5 if lens else 0)  # convexity, above the middle cranial fossa
    cond = surf & ((x - tpl.mni_origin[2]) * side > 40) & (z > lo_z) & (z < zc + 55)
    p = _sample_point(rng, tpl, cond)
    box = _box(p, extent + thickness + 2, tpl.gm.shape)
    d = tpl.depth[box]
    xs = np.arange(box[2].start, box[2].stop) - tpl.mni_origin[2]
    # candidates: the thin layer under the inner table on the lesion's side of the falx
    shell = tpl.icv[box] & (d < thickness + 1.5) & ((xs * side) > 1.5)[None, None, :]
    cz, cy, cx = np.nonzero(shell)
    dist = np.sqrt(
        (cz + box[0].start - p[0]) ** 2
        + (cy + box[1].start - p[1]) ** 2
        + (cx + box[2].start - p[2]) ** 2
    )
    u = np.clip(1.0 - (dist / extent) ** 2, 0.0, 1.0)
    prof = np.sqrt(u) if lens else u**0.35  # lens is convex; crescent is flatter and long
    thk = thickness * prof
    dv = d[cz, cy, cx]
    a = np.clip(thk - dv + 0.5, 0.0, 1.0) * (thk > 0.3)
    if not np.any(a > 0.5):
        a = np.clip(thk - dv + 1.5, 0.0, 1.0)
    alpha = np.zeros(d.shape, dtype=np.float32)
    alpha[cz, cy, cx] = a
    _push(anat, tpl, p, extent * 0.4, thickness * 0.6)
    anat.overlays.append((box, alpha, hu))
    _add_lesion_alpha(anat, box, alpha)
    anat.params.update(lesion_centre=p.tolist(), lesion_thickness_mm=thickness, side=side)
    return alpha


def _lesion_sdh(anat: _Anatomy, tpl: _Template, rng: np.random.Generator, subtle: bool) -> None:
    if subtle:
        thickness = rng.uniform(3.0, 6.0)
        hu = rng.uniform(36, 46)  # isodense (subacute) - the classic miss
    else:
        thickness = rng.uniform(8.0, 18.0)
        hu = rng.uniform(58, 80)
    _extra_axial(anat, tpl, rng, thickness=thickness, extent=rng.uniform(45, 70), hu=hu, lens=False)
    anat.params["lesion_hu"] = hu


def _lesion_edh(anat: _Anatomy, tpl: _Template, rng: np.random.Generator, subtle: bool) -> None:
    thickness = rng.uniform(4.0, 7.0) if subtle else rng.uniform(9.0, 22.0)
    hu = rng.uniform(55, 65) if subtle else rng.uniform(62, 88)
    _extra_axial(anat, tpl, rng, thickness=thickness, extent=rng.uniform(22, 38), hu=hu, lens=True)
    anat.params["lesion_hu"] = hu


def _lesion_sah(anat: _Anatomy, tpl: _Template, rng: np.random.Generator, subtle: bool) -> None:
    """Blood replacing CSF in sulci/cisterns (aneurysmal: basal; traumatic: convexity)."""
    basal = (not subtle) and rng.random() < 0.6
    if basal:  # suprasellar, ambient and sylvian cisterns: flat and wide
        c = _mni_to_index(tpl, rng.uniform(-6, 6), rng.uniform(-8, 6), rng.uniform(-14, -6))
        rad = rng.uniform(28, 40)
        radii = np.array([rng.uniform(7, 10), rad, rad])
    else:
        cond = (tpl.depth > 3) & (tpl.depth < 10)
        c = _sample_point(rng, tpl, cond, side=int(rng.choice([-1, 1])))
        rad = rng.uniform(8, 14) if subtle else rng.uniform(15, 28)
        radii = np.full(3, rad)
    box = _box(c, radii * 1.3, tpl.gm.shape)
    bz, by, bx = _box_coords(box)
    q = ((bz - c[0]) / radii[0]) ** 2 + ((by - c[1]) / radii[1]) ** 2
    w = np.exp(-1.62 * (q + ((bx - c[2]) / radii[2]) ** 2))
    csf = np.clip(1.0 - tpl.gm[box] - tpl.wm[box], 0, 1) * tpl.icv[box]
    csf = np.maximum(csf, np.clip(tpl.sulc[box] * 2.5, 0, 1))  # blurred sulci in the template
    csf = np.maximum(csf, anat.csf_extra[box])
    csf = csf * (tpl.vent_sd[box] > 1.5)  # not in the ventricles
    alpha = (csf * np.clip(w * 2.2, 0, 1)).astype(np.float32)
    hu = rng.uniform(48, 58) if subtle else rng.uniform(60, 80)
    anat.overlays.append((box, alpha, hu))
    _add_lesion_alpha(anat, box, np.where(alpha > 0.35, alpha, 0).astype(np.float32))
    anat.params.update(lesion_centre=c.tolist(), basal=basal, lesion_hu=hu)


def _lesion_ivh(anat: _Anatomy, tpl: _Template, rng: np.random.Generator, subtle: bool) -> None:
    """Blood layering in the dependent (posterior, patient supine) parts of the ventricles."""
    vent = np.clip(0.5 - tpl.vent_sd / 1.0, 0, 1)
    vent = np.maximum(vent, anat.csf_extra * (tpl.vent_sd < 4))
    idx = np.argwhere(tpl.vent)
    lo, hi = idx.min(0), idx.max(0) + 1
    box = tuple(slice(max(int(a) - 5, 0), int(b) + 5) for a, b in zip(lo, hi, strict=True))
    v = vent[box]
    by = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :, None]
    y_lo, y_hi = lo[1], hi[1]
    # dependent level (fraction of the AP extent from posterior filled)
    frac = rng.uniform(0.08, 0.14) if subtle else rng.uniform(0.2, 0.55)
    level = y_hi - frac * (y_hi - y_lo)
    dep = np.clip((by - level) / 1.5 + 0.5, 0, 1)
    bx = np.arange(box[2].start, box[2].stop, dtype=np.float32)[None, None, :]
    if subtle:  # one occipital horn only
        side = int(rng.choice([-1, 1]))
        dep = dep * ((bx - tpl.mni_origin[2]) * side > 0)
    alpha = (v * dep).astype(np.float32)
    hu = rng.uniform(50, 60) if subtle else rng.uniform(60, 80)
    anat.overlays.append((box, alpha, hu))
    _add_lesion_alpha(anat, box, alpha)
    anat.params.update(lesion_hu=hu, fill_fraction=frac)


def _lesion_territorial(
    anat: _Anatomy, tpl: _Template, rng: np.random.Generator, subtle: bool
) -> None:
    """MCA/ACA/PCA territory wedge: cortex + white matter, hypodense, loses grey-white contrast."""
    side = int(rng.choice([-1, 1]))
    territory = str(rng.choice(["mca", "mca", "aca", "pca"]))
    sx = -side  # MNI x is +right, template x index runs right -> left
    apex = {
        "mca": (sx * 22.0, 5.0, 2.0),
        "aca": (sx * 6.0, 15.0, 15.0),
        "pca": (sx * 12.0, -30.0, 0.0),
    }[territory]
    target = {
        "mca": (sx * 65.0, rng.uniform(-25, 25), rng.uniform(0, 35)),
        "aca": (sx * 10.0, rng.uniform(0, 40), rng.uniform(40, 65)),
        "pca": (sx * 25.0, -85.0, rng.uniform(-5, 15)),
    }[territory]
    a = _mni_to_index(tpl, *apex)
    t = _mni_to_index(tpl, *target)
    axis = (t - a) / np.linalg.norm(t - a)
    length = float(np.linalg.norm(t - a)) + 15
    half_angle = math.radians(rng.uniform(15, 25) if subtle else rng.uniform(22, 38))
    box = _box((a + t) / 2, length * 0.75 + 10, tpl.gm.shape)
    bz, by, bx = _box_coords(box)
    vz, vy, vx = bz - a[0], by - a[1], bx - a[2]
    along = vz * axis[0] + vy * axis[1] + vx * axis[2]
    dist = np.sqrt(vz * vz + vy * vy + vx * vx) + 1e-3
    ang = np.arccos(np.clip(along / dist, -1, 1))
    lobul = np.clip(1.0 + 0.15 * _smooth_noise(rng, ang.shape, 4.0), 0.6, 1.4)
    cone = np.clip((half_angle * lobul - ang) / 0.08, 0, 1)
    start = length * (0.4 if subtle else 0.25)
    alpha = cone * np.clip((along - start) / 3.0, 0, 1)
    tissue = tpl.gm[box] + tpl.wm[box]
    xs = bx - tpl.mni_origin[2]
    alpha = (alpha * np.clip(tissue * 1.3, 0, 1) * ((xs * side) > 1)).astype(np.float32)
    if subtle:  # early: loss of grey-white differentiation, ~3-5 HU darker cortex
        hu = rng.uniform(27, 31)
    else:  # established (hours to days): clearly hypodense, still denser than CSF
        hu = rng.uniform(17, 23)
        _push(anat, tpl, (a + t) / 2, length * 0.3, rng.uniform(1.0, 3.0))
    anat.overlays.append((box, alpha * 0.9, hu))
    _add_lesion_alpha(anat, box, np.where(alpha > 0.5, alpha, 0).astype(np.float32))
    anat.params.update(territory=territory, side=side, lesion_hu=hu)


def _lesion_lacune(anat: _Anatomy, tpl: _Template, rng: np.random.Generator, subtle: bool) -> None:
    n = 1 if subtle else int(rng.integers(1, 4))
    cond = ((tpl.gm > 0.5) & (tpl.depth > 28)) | ((tpl.wm > 0.8) & (tpl.depth > 18))
    cond &= tpl.vent_sd > 4
    for _ in range(n):
        c = _sample_point(rng, tpl, cond)
        rad = rng.uniform(1.5, 2.5) if subtle else rng.uniform(2.5, 7.0)
        radii = rad * rng.uniform(0.8, 1.3, 3)
        box = _box(c, radii.max() * 2 + 2, tpl.gm.shape)
        alpha = _blob(rng, box, c, radii, 0.1, edge=0.7)
        hu = rng.uniform(14, 20) if subtle else rng.uniform(4, 14)
        anat.overlays.append((box, alpha, hu))
        _add_lesion_alpha(anat, box, alpha)
    anat.params.update(n_lacunes=n)


def _lesion_tumour(anat: _Anatomy, tpl: _Template, rng: np.random.Generator, subtle: bool) -> None:
    cond = (tpl.wm > 0.5) & (tpl.depth > 12) & (tpl.vent_sd > 6)
    c = _sample_point(rng, tpl, cond, side=int(rng.choice([-1, 1])))
    rad = rng.uniform(5, 8) if subtle else rng.uniform(10, 22)
    radii = rad * rng.uniform(0.8, 1.2, 3)
    oedema_r = radii + (rng.uniform(3, 7) if subtle else rng.uniform(10, 25))
    box = _box(c, oedema_r.max() * 1.6, tpl.gm.shape)
    if not subtle:
        _push(anat, tpl, c, rad, rad * rng.uniform(0.4, 0.7))
    # vasogenic oedema: finger-like, spreads through white matter and spares the cortex
    oed = _blob(rng, box, c, oedema_r, 0.35, edge=3.0)
    oed = (oed * np.clip(tpl.wm[box] * 1.5, 0, 1)).astype(np.float32)
    mass = _blob(rng, box, c, radii, 0.2, edge=1.5)
    hu_oed = rng.uniform(16, 22)
    hu_mass = rng.uniform(34, 46)
    anat.overlays.append((box, oed * 0.95, hu_oed))
    anat.overlays.append((box, mass, hu_mass))
    if not subtle and rng.random() < 0.5:  # necrotic core
        core = _blob(rng, box, c, radii * 0.5, 0.25, edge=1.0)
        anat.overlays.append((box, core, rng.uniform(12, 22)))
    if rng.random() < 0.25:  # calcification
        calc = _blob(rng, box, c + rng.uniform(-rad / 2, rad / 2, 3), np.full(3, 1.5), 0.0, 0.6)
        anat.overlays.append((box, calc, rng.uniform(150, 300)))
    _add_lesion_alpha(anat, box, np.maximum(mass, np.where(oed > 0.5, oed, 0)))
    anat.params.update(lesion_centre=c.tolist(), lesion_radius_mm=rad)


def _lesion_cavernoma(
    anat: _Anatomy, tpl: _Template, rng: np.random.Generator, subtle: bool
) -> None:
    cond = ((tpl.wm > 0.5) | (tpl.gm > 0.6)) & (tpl.depth > 8) & (tpl.vent_sd > 4)
    c = _sample_point(rng, tpl, cond)
    rad = rng.uniform(2.0, 3.0) if subtle else rng.uniform(4.0, 8.0)
    radii = rad * rng.uniform(0.8, 1.2, 3)
    box = _box(c, rad * 2.5 + 2, tpl.gm.shape)
    alpha = _blob(rng, box, c, radii, 0.35, edge=0.8)  # "popcorn"
    anat.overlays.append((box, alpha, rng.uniform(52, 62) if subtle else rng.uniform(62, 85)))
    if not subtle:
        n = int(rng.integers(1, 4))
        for _ in range(n):
            cc = c + rng.uniform(-rad * 0.5, rad * 0.5, 3)
            calc = _blob(rng, box, cc, np.full(3, rng.uniform(0.8, 1.6)), 0.0, 0.5)
            anat.overlays.append((box, calc, rng.uniform(120, 300)))
    _add_lesion_alpha(anat, box, alpha)
    anat.params.update(lesion_centre=c.tolist(), lesion_radius_mm=rad)


def _lesion_aneurysm(
    anat: _Anatomy, tpl: _Template, rng: np.random.Generator, subtle: bool
) -> None:
    """Unruptured saccular aneurysm: round, mildly hyperdense, in the basal cisterns/sylvian."""
    site = str(rng.choice(["acom", "mca", "pcom", "basilar"]))
    side = float(rng.choice([-1, 1]))
    mni = {
        "acom": (0.0, 12.0, -8.0),
        "mca": (side * 38.0, 2.0, -8.0),
        "pcom": (side * 12.0, -2.0, -12.0),
        "basilar": (0.0, -12.0, -18.0),
    }[site]
    c = _mni_to_index(tpl, *(np.array(mni) + rng.uniform(-2, 2, 3)))
    rad = rng.uniform(2.0, 3.0) if subtle else rng.uniform(4.0, 9.0)
    box = _box(c, rad * 2 + 3, tpl.gm.shape)
    alpha = _blob(rng, box, c, np.full(3, rad) * rng.uniform(0.9, 1.1, 3), 0.05, edge=0.8)
    anat.overlays.append((box, alpha, rng.uniform(48, 56) if subtle else rng.uniform(55, 70)))
    if not subtle and rng.random() < 0.35:  # mural calcification (rim)
        rim = _blob(rng, box, c, np.full(3, rad + 0.8), 0.0, 0.7) - _blob(
            rng, box, c, np.full(3, rad), 0.0, 0.7
        )
        rim = np.clip(rim, 0, 1) * (_smooth_noise(rng, rim.shape, 2.0) > 0.3)
        anat.overlays.append((box, rim.astype(np.float32), rng.uniform(150, 350)))
    _add_lesion_alpha(anat, box, alpha)
    anat.params.update(site=site, lesion_radius_mm=rad)


_LESIONS: dict[str, Callable[[_Anatomy, _Template, np.random.Generator, bool], None]] = {
    "atrophy": _lesion_atrophy,
    "intraparenchymal_haemorrhage": _lesion_iph,
    "subdural_haematoma": _lesion_sdh,
    "epidural_haematoma": _lesion_edh,
    "subarachnoid_haemorrhage": _lesion_sah,
    "intraventricular_haemorrhage": _lesion_ivh,
    "territorial_ischaemia": _lesion_territorial,
    "lacunar_ischaemia": _lesion_lacune,
    "tumour": _lesion_tumour,
    "cavernoma": _lesion_cavernoma,
    "aneurysm": _lesion_aneurysm,
}
assert set(_LESIONS) == set(LESION_FAMILIES)


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------


def _apply_csf_variation(
    anat: _Anatomy, tpl: _Template, vent_grow: float, sulc_open: float
) -> None:
    """Age-like CSF spaces: grow the ventricles by ``vent_grow`` mm, open the sulci."""
    bx = _icv_box(tpl)
    vent = np.clip(0.5 - (tpl.vent_sd[bx] - vent_grow) / 1.2, 0.0, 1.0)
    # do not grow ventricles into the cortex, and keep the septum pellucidum
    vent *= tpl.depth[bx] > 6
    if vent_grow > 0:
        xm = int(tpl.mni_origin[2]) - bx[2].start
        xs = slice(xm - 1, xm + 2)
        v0, sd0 = tpl.vent[bx][:, :, xs], tpl.vent_sd[bx][:, :, xs]
        vent[:, :, xs] = np.minimum(vent[:, :, xs], v0 & (sd0 < -0.5))
    thr = 0.55 - sulc_open
    sul = np.clip((tpl.sulc[bx] - thr) / 0.12, 0.0, 1.0) * (tpl.depth[bx] < 25) * tpl.icv[bx]
    np.maximum(vent, sul, out=anat.csf_extra[bx])


def _icv_box(tpl: _Template) -> tuple[slice, ...]:
    """Bounding box of the cranial cavity (brain-only work is done inside it)."""
    box = getattr(tpl, "_icv_box", None)
    if box is None:
        box = ndi.find_objects(tpl.icv.astype(np.uint8))[0]
        object.__setattr__(tpl, "_icv_box", box)
    return box


def _compose_brain(anat: _Anatomy, tpl: _Template, hu_p: dict[str, float]) -> np.ndarray:
    """Tissue fractions -> HU inside the cranial cavity (CSF elsewhere in it), air outside."""
    bx = _icv_box(tpl)
    keep = 1.0 - anat.csf_extra[bx]
    gm = anat.gm[bx] * keep
    wm = anat.wm[bx] * keep
    hu = np.full(tpl.icv.shape, -1000.0, dtype=np.float32)
    inner = hu_p["csf"] + (hu_p["gm"] - hu_p["csf"]) * gm + (hu_p["wm"] - hu_p["csf"]) * wm
    hu[bx] = np.where(tpl.icv[bx], inner, -1000.0)
    return hu


def _normal_variants(anat: _Anatomy, tpl: _Template, rng: np.random.Generator,
                     calc_scale: float = 1.0) -> dict[str, bool]:
    """Calcified choroid plexus / pineal / falx / basal ganglia: common in normals
    (``calc_scale`` multiplies each variant's chance, for a site's older or younger patients)."""
    found = {"choroid_calc": False, "pineal_calc": False, "falx_calc": False, "bg_calc": False}
    if rng.random() < 0.5 * calc_scale:
        found["choroid_calc"] = True
        for side in (-1, 1):
            if rng.random() < 0.15:
                continue
            c = _mni_to_index(tpl, side * 27 + rng.uniform(-3, 3), -40 + rng.uniform(-4, 4), 16)
            # snap to the nearest ventricle voxel (the atrium)
            box = _box(c, 12, tpl.gm.shape)
            v = np.argwhere(tpl.vent[box])
            if v.size:
                off = np.array([s.start for s in box])
                cand = v + off
                c = cand[np.argmin(np.sum((cand - c) ** 2, 1))].astype(float)
            r = rng.uniform(1.5, 3.5)
            b = _box(c, r * 2 + 2, tpl.gm.shape)
            anat.overlays.append(
                (b, _blob(rng, b, c, np.full(3, r), 0.3, 0.6), rng.uniform(120, 350))
            )
    if rng.random() < 0.45 * calc_scale:
        found["pineal_calc"] = True
        c = _mni_to_index(tpl, rng.uniform(-1, 1), -30 + rng.uniform(-2, 2), 2 + rng.uniform(-2, 2))
        r = rng.uniform(1.5, 3.0)
        b = _box(c, r * 2 + 2, tpl.gm.shape)
        anat.overlays.append((b, _blob(rng, b, c, np.full(3, r), 0.25, 0.6), rng.uniform(120, 400)))
    if rng.random() < 0.07 * calc_scale:
        found["bg_calc"] = True
        for side in (-1, 1):
            c = _mni_to_index(tpl, side * 19, 0 + rng.uniform(-3, 3), 0 + rng.uniform(-2, 2))
            r = rng.uniform(1.5, 3.0)
            b = _box(c, r * 2 + 2, tpl.gm.shape)
            anat.overlays.append(
                (b, _blob(rng, b, c, np.full(3, r), 0.3, 0.6) * 0.8, rng.uniform(90, 200))
            )
    found["falx_calc"] = bool(rng.random() < 0.15 * calc_scale)
    return found


@lru_cache(maxsize=1)
def _falx_alpha() -> tuple[tuple[slice, ...], np.ndarray]:
    """Falx cerebri: a thin midline sheet in the interhemispheric fissure above the callosum."""
    tpl = _template()
    xm = tpl.mni_origin[2]
    box = (slice(0, tpl.gm.shape[0]), slice(0, tpl.gm.shape[1]), slice(int(xm) - 2, int(xm) + 3))
    x = np.arange(box[2].start, box[2].stop, dtype=np.float32)[None, None, :]
    sheet = np.clip(1.0 - np.abs(x - xm) / 0.9, 0, 1)
    tissue = tpl.gm[box] + tpl.wm[box]
    mid = tissue[:, :, 2:3]
    fissure = (mid < 0.45) & tpl.icv[box][:, :, 2:3] & (tpl.vent_sd[box][:, :, 2:3] > 3)
    z = np.arange(box[0].start, box[0].stop)[:, None, None]
    fissure &= z > tpl.mni_origin[0] + 0  # above the AC-PC plane
    # continuous from front to back: keep only where the fissure column reaches the vertex
    alpha = (sheet * fissure).astype(np.float32)
    return box, alpha


def _skull_and_scalp(
    hu: np.ndarray, tpl: _Template, rng: np.random.Generator, p: dict[str, float]
) -> None:
    """Fill the head outside the cranial cavity: vault (tables + diploe), skull base, scalp,
    face, orbits, sinuses; everything else stays air."""
    st = tpl.outer_cls_start

    def run(c: int) -> slice:
        return slice(int(st[c]), int(st[c + 1]))

    cort, dip = p["bone_cortical"], p["bone_diploe"]
    val = np.empty(tpl.outer.shape, dtype=np.float32)
    # vault: bone from the envelope out to the skull thickness, then scalp, then air
    sh = run(_CLS_SHELL)
    d, tex, se = tpl.outer_d[sh], tpl.texture[sh], tpl.outer_se[sh]
    t_field = p["skull_mm"] * tpl.outer_t[sh]
    rel = d / t_field
    table = np.clip(np.minimum(rel, 1 - rel) * t_field / 1.6, 0, 1)  # 0 at the tables
    bone_hu = cort + (dip - cort) * table + 120.0 * tex * table
    scalp = p["scalp_mm"] + se
    sfrac = (d - t_field) / scalp
    fat = np.clip(1.0 - np.abs(sfrac - 0.55) / 0.3, 0, 1) * np.clip(1.0 - se / 4.0, 0.15, 1)
    scalp_hu = p["soft"] * (1 - fat) + p["fat"] * fat
    val[sh] = np.where(rel <= 1.0, bone_hu, np.where(sfrac <= 1.0, scalp_hu, -1000.0))
    b = run(_CLS_BASE)
    val[b] = (0.5 * (cort + dip) + 250.0 * tpl.texture[b]) * p.get("base_bone_scale", 1.0)
    f = run(_CLS_FACE)
    fd, tex = tpl.outer_depth[f], tpl.texture[f]
    # subcutaneous fat under the skin, and irregular deep fat planes between the muscles
    ffat = np.clip((fd - 1.5) / 1.0, 0, 1) * np.clip((9.0 - fd) / 1.5, 0, 1)
    ffat = np.maximum(ffat, np.clip((tex - 0.9) / 0.4, 0, 1) * np.clip((fd - 10.0) / 3.0, 0, 1))
    val[f] = p["soft"] * (1 - ffat) + p["fat"] * ffat + 4.0 * tex
    val[run(_CLS_AIR)] = -1000.0
    val[run(_CLS_ORBIT_FAT)] = p["fat"] - 10.0
    val[run(_CLS_GLOBE)] = p["globe"]
    val[run(_CLS_LENS)] = p["lens"]
    t = run(_CLS_THIN_BONE)
    val[t] = 0.6 * cort + 100.0 * tpl.texture[t]
    hu.ravel()[tpl.outer] = val


def _hu_params(rng: np.random.Generator) -> dict[str, float]:
    wm = rng.uniform(22, 29)
    return {
        "csf": rng.uniform(3, 12),
        "wm": wm,
        "gm": rng.uniform(max(35.0, wm + 8.0), 44.0),
        "bone_cortical": rng.uniform(1700, 2300),
        "bone_diploe": rng.uniform(600, 1000),
        "soft": rng.uniform(35, 55),
        "fat": rng.uniform(-110, -70),
        "skull_mm": rng.uniform(5.5, 8.5),
        "globe": rng.uniform(8, 20),
        "lens": rng.uniform(70, 110),
        "scalp_mm": rng.uniform(4.0, 7.5),
    }


def _jsonable(d: dict) -> dict:
    """Plain-python copy of a parameter dict (numpy scalars/arrays -> float/list)."""
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            out[k] = v.tolist()
        elif isinstance(v, np.generic):
            out[k] = v.item()
        else:
            out[k] = v
    return out


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation in (z, y, x) coordinates; angles in radians."""
    cz, sz = math.cos(yaw), math.sin(yaw)  # about z (in-plane)
    cy, sy = math.cos(pitch), math.sin(pitch)  # about x (nodding)
    cx, sx = math.cos(roll), math.sin(roll)  # about y (tilt)
    r_yaw = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])
    r_pitch = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    r_roll = np.array([[cx, 0, -sx], [0, 1, 0], [sx, 0, cx]])
    return r_yaw @ r_pitch @ r_roll


def _smooth_1d(rng: np.random.Generator, n: int, spacing: float, scale_mm: float) -> np.ndarray:
    k = max(int(math.ceil(n * spacing / scale_mm)) + 2, 3)
    knots = rng.standard_normal(k)
    return np.interp(np.linspace(0, k - 1, n), np.arange(k), knots).astype(np.float32)


def _up2(a: np.ndarray) -> np.ndarray:
    """2x linear in-plane upsampling on a cell-centred grid (much faster than ndimage.zoom)."""
    for axis in (1, 2):
        prev = np.concatenate([a.take([0], axis), a.take(np.arange(a.shape[axis] - 1), axis)], axis)
        nxt = np.concatenate([a.take(np.arange(1, a.shape[axis]), axis), a.take([-1], axis)], axis)
        even = 0.75 * a + 0.25 * prev
        odd = 0.75 * a + 0.25 * nxt
        shape = list(a.shape)
        shape[axis] *= 2
        out = np.empty(shape, dtype=np.float32)
        idx: list[slice] = [slice(None)] * 3
        idx[axis] = slice(0, None, 2)
        out[tuple(idx)] = even
        idx[axis] = slice(1, None, 2)
        out[tuple(idx)] = odd
        a = out
    return a


def _warp_sparse(
    fields: list[np.ndarray], support: np.ndarray, coords: np.ndarray
) -> list[np.ndarray]:
    """Like map_coordinates(order=1, cval=0) for each field, but only inside the bounding box
    of ``support > 0`` (lesions are small: this saves most of a second per case)."""
    outs = [np.zeros(coords.shape[1:], dtype=np.float32) for _ in fields]
    nz = np.argwhere(support > 0)
    if nz.size == 0:
        return outs
    lo = np.maximum(nz.min(0) - 1, 0)
    hi = np.minimum(nz.max(0) + 2, support.shape)
    sel = np.ones(coords.shape[1:], dtype=bool)
    for k in range(3):
        sel &= (coords[k] >= lo[k]) & (coords[k] <= hi[k] - 1)
    if not sel.any():
        return outs
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    pts = np.stack([coords[k][sel] - lo[k] for k in range(3)])
    for f, out in zip(fields, outs, strict=True):
        crop = np.asarray(f[box], dtype=np.float32)
        out[sel] = ndi.map_coordinates(crop, pts, order=1, mode="constant", cval=0.0,
                                       prefilter=False)  # fmt: skip
    return outs


def _head_holder(
    rng: np.random.Generator, matrix: int, ps: float, shift: np.ndarray, y_post: float
) -> tuple[np.ndarray, float] | None:
    """The curved plastic/carbon head holder under the occiput (most scans show one); it lies
    outside the head, so preprocessing must ignore it."""
    if rng.random() >= 0.75:
        return None
    radius = rng.uniform(95.0, 120.0)
    gap = rng.uniform(1.0, 6.0)
    thick = rng.uniform(3.0, 6.0)
    hu = float(rng.uniform(80.0, 260.0))
    c = (np.arange(matrix) - (matrix - 1) / 2.0) * ps
    y = (c - shift[1])[:, None]
    x = (c - shift[2])[None, :]
    yc = y_post + gap + thick - radius  # the arc's inner surface touches the occiput
    r = np.sqrt((y - yc) ** 2 + x**2)
    arc = (r >= radius - thick) & (r <= radius) & ((y - yc) > radius * math.cos(math.radians(60)))
    return arc, hu


def make_case(
    seed: int,
    label: str = "normal",
    *,
    subtle: bool | None = None,
    matrix: int = 512,
    site: str | SiteProfile | None = None,
) -> SynthCase:
    """Build one synthetic head CT.

    The same seed gives the same head (pose, shape, tissue, noise) whatever the label, so a
    lesion can be compared with its own normal; the lesion draws from a separate stream.
    ``site`` picks a ``triage_model.sites`` profile (scanner, acquisition, pose, anatomy);
    the default is the training site, whose cases are those of the original generator.
    With a gantry tilt, ``hu`` is the stack of tilted slices as the scanner reconstructs them
    (``meta["gantry_tilt_deg"]``; the slices are ``thickness`` apart along their normal and
    the table moves ``thickness / cos(tilt)`` between them).
    """
    prof = get_site(site)
    if label != "normal" and label not in LESION_FAMILIES:
        raise ValueError(f"unknown label {label!r}; expected 'normal' or one of {LESION_FAMILIES}")
    if matrix < 16 or matrix % 2:
        raise ValueError(f"matrix must be an even number >= 16, got {matrix}")
    ss = np.random.SeedSequence(int(seed))
    # the site's own draws come from a 7th stream, so the training site's cases are unchanged
    rng_anat, rng_var, rng_les, rng_geo, rng_noise, rng_holder, rng_site = (
        np.random.default_rng(s) for s in ss.spawn(7)
    )
    if subtle is None:
        subtle = bool(label != "normal" and rng_les.random() < SUBTLE_PROBABILITY)
    subtle = bool(subtle) and label != "normal"

    tpl = _template()
    hu_p = _hu_params(rng_anat)
    vent_grow = float(rng_anat.uniform(*prof.vent_grow_mm))
    sulc_open = float(rng_anat.uniform(*prof.sulc_open))
    site_p = _site_draws(prof, rng_site)
    if not prof.is_train:
        hu_p["skull_mm"] *= site_p["skull_scale"]
        hu_p["base_bone_scale"] = site_p["base_bone_scale"]
    anat = _Anatomy(gm=tpl.gm.copy(), wm=tpl.wm.copy(), csf_extra=np.zeros_like(tpl.gm))
    anat.params.update(vent_grow=vent_grow, sulc_open=sulc_open)
    _apply_csf_variation(anat, tpl, vent_grow, sulc_open)
    variants = _normal_variants(anat, tpl, rng_var, prof.calc_scale)

    if label != "normal":
        _LESIONS[label](anat, tpl, rng_les, subtle)

    hu = _compose_brain(anat, tpl, hu_p)
    # falx: faint in most people, denser (calcified) in some
    fbox, falx = _falx_alpha()
    falx_hu = rng_var.uniform(120, 250) if variants["falx_calc"] else rng_var.uniform(45, 60)
    hu[fbox] = hu[fbox] * (1 - falx * 0.8) + falx * 0.8 * falx_hu
    for box, alpha, val in anat.overlays:
        a = alpha * tpl.icv[box]  # lesions live inside the cranial cavity
        hu[box] = hu[box] * (1 - a) + a * val
    _skull_and_scalp(hu, tpl, rng_anat, hu_p)
    if not prof.is_train:
        _sinus_and_mastoid(hu, tpl, rng_site, site_p)
    lesion_tpl = anat.lesion
    lesion_params = _jsonable(anat.params)
    del anat

    # ---------------------------------------------------------------- scanner geometry
    thickness = float(rng_geo.choice(list(prof.thickness_mm)))
    fov = float(rng_geo.uniform(*prof.fov_mm))
    ps = fov / matrix
    yaw = math.radians(rng_geo.uniform(*prof.yaw_deg))
    pitch = math.radians(rng_geo.uniform(*prof.pitch_deg))
    roll = math.radians(rng_geo.uniform(*prof.roll_deg))
    tilt = math.radians(site_p["tilt_deg"])
    sin_t, cos_t = math.sin(tilt), math.cos(tilt)
    scale = rng_geo.uniform(0.92, 1.08, 3) * rng_geo.uniform(0.95, 1.05)
    shift = np.array(
        [0.0, rng_geo.uniform(-12, 12) + 8.0, rng_geo.uniform(-10, 10)]
    )  # head sits a bit posterior (headrest)
    rot = _rotation(yaw, pitch, roll)
    a_fwd = rot @ np.diag(scale)  # template mm (about centre) -> scanner mm
    a_inv = np.linalg.inv(a_fwd)

    # slice extent along the slice normal (scanner z without tilt): from just below the brain's
    # lowest point to the vertex. With a gantry tilt the slice planes are z*cos - y*sin = const
    # (scanner y about the field-of-view centre) and a pixel row v lies at z = c + v*sin,
    # y = v*cos on the slice through table position c.
    head = tpl.d_skull <= 12.0  # skull + scalp envelope
    pts = np.argwhere(head[::4, ::4, ::4]) * 4.0 - tpl.centre
    yx = pts @ a_fwd.T
    zs = yx[:, 0] * cos_t - (yx[:, 1] + shift[1]) * sin_t
    brain_pts = np.argwhere(tpl.icv[::4, ::4, ::4]) * 4.0 - tpl.centre
    bp = brain_pts @ a_fwd.T
    zb = bp[:, 0] * cos_t - (bp[:, 1] + shift[1]) * sin_t
    z_lo = float(zb.min()) - rng_geo.uniform(0.0, 6.0)
    z_hi = float(zs.max()) + 2.0
    n_slices = int(math.ceil((z_hi - z_lo) / thickness))
    sub = max(int(math.ceil(thickness / 1.7)), 1)
    z_centres = z_lo + (np.arange(n_slices) + 0.5) * thickness
    z_sub = (z_centres[:, None] + ((np.arange(sub) + 0.5) / sub - 0.5)[None, :] * thickness).ravel()

    # intermediate in-plane grid at 2x the output pixel size, cropped to the head
    ip = 2.0 * ps
    n_ip = matrix // 2
    coords_ip = (np.arange(n_ip) - (n_ip - 1) / 2.0) * ip  # scanner mm, centred at FOV centre
    v_head = yx[:, 0] * sin_t + (yx[:, 1] + shift[1]) * cos_t  # image row coordinate
    y_min, y_max = v_head.min() - 6, v_head.max() + 6
    x_min, x_max = yx[:, 2].min() + shift[2] - 6, yx[:, 2].max() + shift[2] + 6
    iy = np.flatnonzero((coords_ip >= y_min) & (coords_ip <= y_max))
    ix = np.flatnonzero((coords_ip >= x_min) & (coords_ip <= x_max))
    ys = coords_ip[iy] - shift[1]
    xs = coords_ip[ix] - shift[2]

    # elastic: sum of separable smooth random products (cheap, smooth, ~2 mm)
    amp = rng_geo.uniform(1.0, 3.0)
    disp = []
    for _ in range(3):
        f = np.zeros((len(z_sub), len(ys), len(xs)), dtype=np.float32)
        for _k in range(2):
            f += (
                _smooth_1d(rng_geo, len(z_sub), thickness / sub, 60)[:, None, None]
                * _smooth_1d(rng_geo, len(ys), ip, 60)[None, :, None]
                * _smooth_1d(rng_geo, len(xs), ip, 60)[None, None, :]
            )
        disp.append(f * (amp / 1.5))
    if tilt:  # sub-slice d along the normal (cos, -sin) of the plane through table position c
        d_sub = np.tile(((np.arange(sub) + 0.5) / sub - 0.5) * thickness, n_slices)[:, None, None]
        c = np.repeat(z_centres / cos_t, sub)[:, None, None]
        v = coords_ip[iy][None, :, None]
        zz = (c + v * sin_t + d_sub * cos_t).astype(np.float32)
        yy = (v * cos_t - d_sub * sin_t - shift[1]).astype(np.float32)
    else:
        zz = z_sub.astype(np.float32)[:, None, None]
        yy = ys.astype(np.float32)[None, :, None]
    xx = xs.astype(np.float32)[None, None, :]
    coords = np.empty((3, len(z_sub), len(ys), len(xs)), dtype=np.float32)
    for k in range(3):
        coords[k] = a_inv[k, 0] * zz + a_inv[k, 1] * yy + a_inv[k, 2] * xx + tpl.centre[k]
        coords[k] += disp[k]
    del disp
    vol = ndi.map_coordinates(hu, coords, order=1, mode="constant", cval=-1000.0, prefilter=False)
    vol = vol.reshape(n_slices, sub, len(iy), len(ix)).mean(1)
    # residual beam-hardening cupping/capping: a smooth radial +-2 HU bias in soft tissue
    cup = float(rng_noise.uniform(-prof.cupping_hu, prof.cupping_hu))
    r2 = (ys[:, None] ** 2 + xs[None, :] ** 2) / 80.0**2
    vol += (cup * (np.clip(r2, 0, 1.5) - 0.5)).astype(np.float32)[None] * (vol > -200) * (vol < 300)
    les = None
    if lesion_tpl is not None:
        les, les_icv = (
            w.reshape(n_slices, sub, len(iy), len(ix)).mean(1)
            for w in _warp_sparse([lesion_tpl, tpl.icv], lesion_tpl, coords)
        )
    del coords, hu

    # 2x in-plane upsample into the full matrix
    out = np.full((n_slices, matrix, matrix), -1000.0, dtype=np.float32)
    y0, x0 = int(iy[0]) * 2, int(ix[0]) * 2
    up = _up2(vol)
    out[:, y0 : y0 + up.shape[1], x0 : x0 + up.shape[2]] = up[:, : matrix - y0, : matrix - x0]
    mask = np.zeros(out.shape, dtype=bool)
    if les is not None:
        lup = _up2(les)
        # voxels mostly inside the cranial cavity: a thin haematoma's partial-volume skull
        # is not lesion
        m = (lup >= 0.4) & (_up2(les_icv) >= 0.7)
        if not m.any() and lup.max() > 0:
            m = lup >= 0.5 * lup.max()
        mask[:, y0 : y0 + up.shape[1], x0 : x0 + up.shape[2]] = m[:, : matrix - y0, : matrix - x0]

    holder = _head_holder(rng_holder, matrix, ps, shift, float(yx[:, 1].max()))
    if holder is not None:
        mask2d, holder_hu = holder
        region = (out < -500.0) & mask2d[None]
        out[region] = holder_hu

    if not prof.is_train:
        _site_artefacts(out, prof, site_p, ps, rng_site)
    # quantum noise, slightly correlated like a standard soft-tissue kernel (white for a sharp
    # kernel, smoother for a smooth one); thinner slices are noisier (fewer photons per voxel):
    # sd ~ 1/sqrt(thickness), 3-6 HU at the training site
    noise_sd = float(np.clip(rng_noise.uniform(*prof.noise_hu) * math.sqrt(5.0 / thickness),
                             *prof.noise_clip))
    if prof.kernel == "sharp":
        n = rng_noise.standard_normal((n_slices, matrix, matrix), dtype=np.float32)
    else:
        half = (n_slices, matrix // 2, matrix // 2)
        n = rng_noise.standard_normal(half, dtype=np.float32)
        n = _up2(n)
        if prof.kernel == "smooth":
            n = ndi.gaussian_filter(n, (0, 1.2, 1.2)).astype(np.float32)
    n *= noise_sd / max(float(n.std()), 1e-6)
    out += n
    np.clip(out, -1024.0, 3071.0, out=out)

    meta = {
        "thickness_mm": thickness,
        "fov_mm": fov,
        "pixel_mm": ps,
        "noise_sd": noise_sd,
        "pose_deg": [math.degrees(yaw), math.degrees(pitch), math.degrees(roll)],
        "scale": scale.tolist(),
        "shift_mm": shift.tolist(),
        "elastic_mm": float(amp),
        "z_first_mm": float(z_centres[0]),
        "origin_mm": [
            float(z_centres[0] / cos_t - (matrix - 1) / 2.0 * ps * sin_t),
            float(-(matrix - 1) / 2.0 * ps * cos_t),
            float(-(matrix - 1) / 2.0 * ps),
        ],
        "gantry_tilt_deg": float(math.degrees(tilt)),
        "site": prof.name,
        "kernel": prof.kernel,
        "site_draws": site_p,
        "hu": hu_p,
        "vent_grow_mm": vent_grow,
        "sulc_open": sulc_open,
        "variants": variants,
        "version": _VERSION,
        "anatomy": lesion_params,
    }
    return SynthCase(
        hu=out,
        spacing_mm=(thickness, ps, ps),
        lesion_mask=mask,
        label=label,
        subtle=subtle,
        seed=int(seed),
        meta=meta,
    )


def _site_draws(prof: SiteProfile, rng: np.random.Generator) -> dict[str, float]:
    """One case's draws of the site knobs that the original generator did not have."""
    if prof.is_train:
        return {"tilt_deg": 0.0}
    return {
        "tilt_deg": float(rng.uniform(*prof.tilt_deg)),
        "skull_scale": float(rng.uniform(*prof.skull_scale)),
        "base_bone_scale": float(rng.uniform(*prof.base_bone_scale)),
        "streak_hu": float(rng.uniform(*prof.streak_hu)),
        "beam_hardening_hu": float(rng.uniform(*prof.beam_hardening_hu)),
        "sinus_fluid": float(rng.random() < prof.sinus_fluid_p),
        "mastoid_sclerosis": float(rng.random() < prof.mastoid_sclerosis_p),
    }


def _sinus_and_mastoid(hu: np.ndarray, tpl: _Template, rng: np.random.Generator,
                       draws: dict[str, float]) -> None:
    """Sinus disease (fluid, mucosal thickening) and poorly pneumatised, bony mastoids."""
    st = tpl.outer_cls_start
    air = tpl.outer[int(st[_CLS_AIR]) : int(st[_CLS_AIR + 1])]
    tex = tpl.texture[int(st[_CLS_AIR]) : int(st[_CLS_AIR + 1])]
    x_mni = tpl.mni_origin[2] - np.unravel_index(air, hu.shape)[2]
    mastoid = np.abs(x_mni) > 36.0
    if draws["sinus_fluid"]:
        thr = rng.uniform(-0.6, 0.8)  # how much of the sinus air is replaced
        fill = ~mastoid & (tex > thr)
        hu.ravel()[air[fill]] = rng.uniform(15.0, 35.0)
    if draws["mastoid_sclerosis"]:
        fill = mastoid & (tex > rng.uniform(-0.8, 0.2))
        hu.ravel()[air[fill]] = rng.uniform(500.0, 1100.0) + 150.0 * tex[fill]


def _site_artefacts(out: np.ndarray, prof: SiteProfile, draws: dict[str, float], ps: float,
                    rng: np.random.Generator) -> None:
    """Reconstruction kernel, streaks and beam hardening from dense skull-base bone, in place.

    Streaks radiate from the dense bone in the middle of the head (skull base), so their
    strength follows how much of it a slice holds; the dark band between the petrous bones is
    the classic beam-hardening artefact of posterior-fossa CT.
    """
    n, ny, nx = out.shape
    yy = (np.arange(ny, dtype=np.float32)[:, None] - (ny - 1) / 2.0) * ps
    xx = (np.arange(nx, dtype=np.float32)[None, :] - (nx - 1) / 2.0) * ps
    amp, bh = draws["streak_hu"], draws["beam_hardening_hu"]
    if amp > 0 or bh > 0:
        head = out > -500.0
        dense = out > 1000.0
        area = head.sum((1, 2))
        for k in range(n):
            if area[k] < 0.6 * area.max():  # the vertex: tangential vault, no streaks
                continue
            hy, hx = (float(v.mean()) for v in np.nonzero(head[k]))
            cy, cx = (hy - (ny - 1) / 2.0) * ps, (hx - (nx - 1) / 2.0) * ps
            # dense bone well inside the head's outline (skull base, not the vault's ring)
            r_in = min(50.0, 0.55 * math.sqrt(float(head[k].sum()) * ps * ps / math.pi))
            central = dense[k] & ((yy - cy) ** 2 + (xx - cx) ** 2 < r_in**2)
            w = min(float(central.sum()) * ps * ps / 400.0, 1.0)
            if w < 0.05:
                continue
            by, bx = (float(v.mean()) for v in np.nonzero(central))
            by, bx = (by - (ny - 1) / 2.0) * ps, (bx - (nx - 1) / 2.0) * ps
            art = np.zeros((ny, nx), dtype=np.float32)
            for _ in range(int(rng.integers(6, 13))):
                th = rng.uniform(0.0, math.pi)
                oy, ox = by + rng.normal(0, 8.0), bx + rng.normal(0, 15.0)
                d = (xx - ox) * math.sin(th) - (yy - oy) * math.cos(th)
                along = (xx - ox) * math.cos(th) + (yy - oy) * math.sin(th)
                a = amp * w * rng.uniform(0.5, 1.0) * rng.choice([-1.0, 1.0])
                art += a * np.exp(-0.5 * (d / 0.8) ** 2 - np.abs(along) / 70.0)
            if bh > 0:
                band = np.exp(-0.5 * ((yy - by) / 6.0) ** 2) * np.clip(1 - np.abs(xx - bx) / 55, 0, 1)
                art -= bh * w * band
            soft = head[k] & (out[k] < 300.0)
            out[k][soft] += art[soft]
    if prof.kernel == "smooth":
        out[:] = ndi.gaussian_filter(out, (0, 0.8 / ps, 0.8 / ps))
    elif prof.kernel == "sharp":  # edge enhancement, with over- and undershoot at the skull
        blur = ndi.gaussian_filter(out, (0, 1.0 / ps, 1.0 / ps))
        out += 1.0 * (out - blur)


def make_dataset_plan(normals: int, abnormals: int, seed: int) -> list[tuple[int, str]]:
    """Deterministic ``(case_seed, label)`` list: abnormals cycle through every family.

    Case seeds come from a SeedSequence of ``seed`` so two plans with different seeds never
    share heads, and the order is shuffled so a prefix of the plan is still a mixed set.
    """
    if normals < 0 or abnormals < 0:
        raise ValueError("normals and abnormals must be >= 0")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    labels = ["normal"] * normals + [
        LESION_FAMILIES[i % len(LESION_FAMILIES)] for i in range(abnormals)
    ]
    order = rng.permutation(len(labels))
    seeds = np.random.SeedSequence([int(seed), 0xCA5E]).generate_state(len(labels), np.uint32)
    return [(int(seeds[i]), labels[j]) for i, j in enumerate(order)]
