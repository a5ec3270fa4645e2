"""Labelled cases for ``triage-agent train``, ``evaluate`` and ``calibrate``: synthetic cases
generated in memory, folders of DICOM series (``labels.csv`` as ``triage-agent synth`` writes
it), and the .npz cache both go through.

Not on the node's runtime path (it needs tqdm, a training dependency); the node scores with
``triage_agent.inference``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from triage_agent.inference import find_series

log = logging.getLogger(__name__)


@dataclass
class Case:
    """One preprocessed series with its label (for training and evaluation)."""

    case_id: str
    label: str  # "normal" or a lesion family
    subtle: bool
    x: np.ndarray  # (N,S,S) float32
    brain: np.ndarray  # (N,S,S) bool
    lesion: np.ndarray | None  # (N,S,S) bool
    hu: np.ndarray | None = None  # (N,S,S) HU at model resolution
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def abnormal(self) -> bool:
        return self.label != "normal"


def _save_case(path: Path, c: Case) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary name of this process's own: two jobs that share a cache folder (evaluate runs
    # side by side, DDP ranks) may write the same case at once, and the last rename wins
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    try:
        np.savez_compressed(
            tmp, x=c.x.astype(np.float16), brain=c.brain,
            lesion=c.lesion if c.lesion is not None else np.zeros((0,), bool),
            has_lesion=np.array(c.lesion is not None), label=np.array(c.label),
            hu=c.hu.astype(np.float16) if c.hu is not None else np.zeros((0,), np.float16),
            subtle=np.array(c.subtle), case_id=np.array(c.case_id),
        )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_case(path: Path) -> Case:
    with np.load(path) as z:
        lesion = z["lesion"] if bool(z["has_lesion"]) else None
        hu = z["hu"].astype(np.float32) if "hu" in z.files and z["hu"].size else None
        return Case(str(z["case_id"]), str(z["label"]), bool(z["subtle"]),
                    z["x"].astype(np.float32), z["brain"].astype(bool), lesion, hu)


@functools.lru_cache(maxsize=1)
def _data_code_tag() -> str:
    """Short hash of the generator + preprocessing source: caches go stale when either changes."""
    h = hashlib.sha1()
    for mod in ("triage_model.synth", "triage_agent.preprocess"):
        import importlib

        f = getattr(importlib.import_module(mod), "__file__", None)
        if f:
            h.update(Path(f).read_bytes())
    return h.hexdigest()[:8]


def synthetic_case(seed: int, label: str, *, size: int = 128, matrix: int = 512,
                   cache_dir: Path | None = None) -> Case:
    """Generate one synthetic case in memory (cached as .npz under ``cache_dir``)."""
    cache = None
    if cache_dir is not None:
        cache = (Path(cache_dir) /
                 f"synth-{label}-seed{seed}-m{matrix}-s{size}-{_data_code_tag()}.npz")
        if cache.exists():
            try:
                return _load_case(cache)
            except Exception as e:  # noqa: BLE001 - a broken cache entry is regenerated
                log.warning("ignoring broken cache %s: %s", cache, e)
    from triage_model.synth import make_case

    from triage_agent.preprocess import model_inputs, volume_from_case

    sc = make_case(seed, label, matrix=matrix)
    vol = volume_from_case(sc)
    mi = model_inputs(vol, size=size, lesion_mask=sc.lesion_mask)
    c = Case(f"synth-{seed}-{label}", sc.label, bool(sc.subtle), mi.x.astype(np.float32),
             mi.brain.astype(bool), None if mi.lesion is None else mi.lesion.astype(bool),
             getattr(mi, "hu", None))
    if cache is not None:
        _save_case(cache, c)
    return c


def synthetic_cases(normals: int, abnormals: int, seed: int, *, size: int = 128,
                    matrix: int = 512, cache_dir: Path | None = None,
                    progress: bool = True) -> list[Case]:
    from triage_model.synth import make_dataset_plan

    plan = make_dataset_plan(normals, abnormals, seed)
    it: Iterable[tuple[int, str]] = plan
    if progress:
        from tqdm import tqdm

        it = tqdm(plan, desc="synthetic cases", unit="case", mininterval=5.0)
    return [synthetic_case(s, lab, size=size, matrix=matrix, cache_dir=cache_dir) for s, lab in it]


def _read_mask(case_dir: Path, n_slices: int) -> np.ndarray | None:
    """The lesion mask written by ``triage-agent synth`` next to the DICOM files, if any."""
    for name in ("mask.npz", "lesion_mask.npz", "mask.npy", "lesion_mask.npy"):
        p = case_dir / name
        if p.exists():
            if p.suffix == ".npy":
                return np.load(p).astype(bool)
            with np.load(p) as z:
                key = "mask" if "mask" in z.files else ("lesion_mask" if "lesion_mask" in z.files
                                                        else z.files[0])
                return z[key].astype(bool)
    for p in sorted(case_dir.glob("*mask*.nii*")):
        import SimpleITK as sitk

        return sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(bool)
    return None


def folder_cases(root: Path, *, size: int = 128, cache_dir: Path | None = None,
                 labelled: bool = True, progress: bool = True) -> list[Case]:
    """Cases from a folder: a ``labels.csv`` (as ``triage-agent synth`` writes) with one sub-folder
    per case, or (``labelled=False``) any tree of DICOM series, all taken as normal."""
    from triage_agent.preprocess import PreprocessError, model_inputs, read_series

    root = Path(root)
    rows: list[dict[str, str]] = []
    items: list[tuple[str, Path | None, dict[str, Any]]]
    lab_file = root / "labels.csv"
    if lab_file.exists():
        with open(lab_file, newline="") as f:
            rows = list(csv.DictReader(f))
        items = [(r.get("case_id") or r["series_instance_uid"], root / (r.get("case_id") or ""),
                  r) for r in rows]
    elif labelled:
        raise FileNotFoundError(f"{lab_file} not found (a labelled set needs labels.csv)")
    else:
        items = [(uid, None, {"label": "normal", "series_instance_uid": uid, "files": files})
                 for uid, files in find_series([root]).items()]
    it: Iterable[Any] = items
    if progress:
        from tqdm import tqdm

        it = tqdm(items, desc=f"reading {root.name}", unit="series", mininterval=5.0)
    out: list[Case] = []
    for case_id, case_dir, row in it:
        key = hashlib.sha1(f"{root.resolve()}|{case_id}|{size}|{_data_code_tag()}".encode()
                           ).hexdigest()[:16]
        cache = Path(cache_dir) / f"dicom-{key}.npz" if cache_dir is not None else None
        if cache is not None and cache.exists():
            out.append(_load_case(cache))
            continue
        files = row.get("files") or sorted(f for f in Path(case_dir).rglob("*.dcm"))
        try:
            vol = read_series(files)
        except PreprocessError as e:
            log.warning("skipping %s: %s", case_id, e)
            continue
        mask = _read_mask(Path(case_dir), vol.hu.shape[0]) if case_dir is not None else None
        if mask is not None and mask.shape != vol.hu.shape:
            log.warning("%s: mask shape %s != volume %s; ignoring mask", case_id, mask.shape,
                        vol.hu.shape)
            mask = None
        mi = model_inputs(vol, size=size, lesion_mask=mask)
        label = (row.get("label") or "normal").strip()
        subtle = str(row.get("subtle", "")).strip().lower() in ("1", "true", "yes")
        c = Case(str(case_id), label, subtle, mi.x.astype(np.float32), mi.brain.astype(bool),
                 None if mi.lesion is None else mi.lesion.astype(bool), getattr(mi, "hu", None))
        if cache is not None:
            _save_case(cache, c)
        out.append(c)
    return out
