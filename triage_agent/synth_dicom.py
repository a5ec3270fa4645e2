"""Write a ``SynthCase`` as a realistic CT Image Storage series (plus its lesion mask).

Why: the whole node (receiver, completion, selection, preprocessing, scoring, outputs) must be
exercised on DICOM that looks like what a scanner sends, including the awkward parts: varying
rescale slope/intercept, signed and unsigned pixels, field of view, slice thickness. Everything
is derived from the case seed, so re-running writes byte-identical files with the same UIDs.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from triage_model.synth import SynthCase

log = logging.getLogger(__name__)

#: Stored-pixel encodings seen in the wild: (name, signed, slope, intercept, bits stored).
ENCODINGS: tuple[tuple[str, bool, float, float, int], ...] = (
    ("unsigned12", False, 1.0, -1024.0, 12),
    ("signed", True, 1.0, -1024.0, 16),
    ("signed_hu", True, 1.0, 0.0, 16),
    ("unsigned_half", False, 0.5, -1024.0, 16),
)
KERNELS = ("H31s", "STANDARD", "FC21", "J30s", "UB")
#: ConvolutionKernel names written for a site profile's smooth or sharp kernel.
SITE_KERNELS = {"smooth": "H20s", "standard": "STANDARD", "sharp": "H70h"}
MASK_FILE = "mask.npz"
META_FILE = "case.json"


def uid_for(*parts: object) -> str:
    """Deterministic UID: the same case and role always give the same UID."""
    return generate_uid(entropy_srcs=["triage-agent-synth", *[str(p) for p in parts]])


def case_key(case: SynthCase) -> tuple[object, ...]:
    """What a case's UIDs derive from: seed, label, subtlety and (other than the training
    site) the site, so the same seed at two sites gives two different studies."""
    site = str(case.meta.get("site", "train"))
    key: tuple[object, ...] = (case.seed, case.label, bool(case.subtle))
    return key if site == "train" else (*key, f"site-{site}")


def synthetic_patient(seed: int) -> tuple[str, str]:
    """(PatientName, PatientID) that are obviously synthetic and stable for a seed."""
    return f"SYNTHETIC^CASE{seed % 100000:05d}", f"SYN{seed:010d}"


def _encode(hu: np.ndarray, signed: bool, slope: float, intercept: float, bits: int) -> np.ndarray:
    stored = np.rint((hu - intercept) / slope)
    if signed:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return np.clip(stored, lo, hi).astype(np.int16)
    return np.clip(stored, 0, 2**bits - 1).astype(np.uint16)


def write_case_dicom(
    case: SynthCase,
    out_dir: Path,
    *,
    patient_name: str | None = None,
    patient_id: str | None = None,
    study_uid: str | None = None,
    series_number: int = 2,
    encoding: str | None = None,
    write_mask: bool = True,
) -> list[Path]:
    """Write ``case`` as one axial CT series under ``out_dir``; return the slice paths.

    ``encoding`` picks one of ``ENCODINGS`` by name (default: drawn from the seed). The lesion
    mask (same (Z, Y, X) order as ``preprocess.read_series`` returns) goes to ``mask.npz``
    and the case description to ``case.json`` next to the slices when ``write_mask``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([case.seed, 0xD1C0]))
    if encoding is None:
        enc = ENCODINGS[int(rng.integers(len(ENCODINGS)))]
    else:
        by_name = {e[0]: e for e in ENCODINGS}
        if encoding not in by_name:
            raise ValueError(f"unknown encoding {encoding!r}; choose from {sorted(by_name)}")
        enc = by_name[encoding]
        rng.integers(len(ENCODINGS))  # keep the rest of the stream identical
    enc_name, signed, slope, intercept, bits = enc
    kernel = str(rng.choice(KERNELS))
    if case.meta.get("site", "train") != "train":
        kernel = SITE_KERNELS.get(str(case.meta.get("kernel")), kernel)
    default_name, default_id = synthetic_patient(case.seed)
    patient_name = patient_name or default_name
    patient_id = patient_id or default_id

    key = case_key(case)
    site = str(case.meta.get("site", "train"))
    study_uid = study_uid or uid_for("study", *key)
    series_uid = uid_for("series", *key, series_number)
    for_uid = uid_for("frame-of-reference", *key)
    date = dt.date(2020, 1, 1) + dt.timedelta(days=int(rng.integers(0, 2000)))
    t0 = dt.datetime.combine(date, dt.time(0, 0)) + dt.timedelta(
        seconds=int(rng.integers(7 * 3600, 22 * 3600))
    )
    birth = date - dt.timedelta(days=int(rng.integers(20 * 365, 90 * 365)))
    age_years = (date - birth).days // 365
    sex = str(rng.choice(["F", "M"]))
    accession = f"SYN{int(rng.integers(10**7, 10**8))}"
    kvp = str(rng.choice(["100", "120", "120", "140"]))
    ma = int(rng.integers(180, 400))

    hu = case.hu
    nz, ny, nx = hu.shape
    dz, dy, dx = case.spacing_mm
    origin = case.meta.get("origin_mm") or [0.0, -(ny - 1) / 2 * dy, -(nx - 1) / 2 * dx]
    z0, y0, x0 = (float(v) for v in origin)
    table_z = float(rng.uniform(-200.0, -20.0))  # scanner table position offset
    thickness = float(case.meta.get("thickness_mm", dz))
    # gantry tilt as a scanner writes it: the image columns run along (0, cos, sin) in LPS,
    # the table (and so ImagePositionPatient) moves along z by thickness / cos(tilt) per slice
    tilt = float(case.meta.get("gantry_tilt_deg", 0.0))
    cos_t, sin_t = float(np.cos(np.radians(tilt))), float(np.sin(np.radians(tilt)))
    table_step = dz / cos_t
    desc = f"HEAD W/O {thickness:g}mm"

    stored = _encode(hu, signed, slope, intercept, bits)
    paths: list[Path] = []
    for k in range(nz):
        ds = Dataset()
        sop_uid = UID(uid_for("sop", *key, series_number, k))
        fm = FileMetaDataset()
        fm.MediaStorageSOPClassUID = CTImageStorage
        fm.MediaStorageSOPInstanceUID = sop_uid
        fm.TransferSyntaxUID = ExplicitVRLittleEndian
        fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        fm.ImplementationVersionName = "TRIAGE_SYNTH_1"
        ds.file_meta = fm

        # SOP common
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.InstanceCreationDate = date.strftime("%Y%m%d")
        ds.InstanceCreationTime = t0.strftime("%H%M%S")
        # patient
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = birth.strftime("%Y%m%d")
        ds.PatientSex = sex
        ds.PatientAge = f"{min(age_years, 999):03d}Y"
        ds.PatientIdentityRemoved = "NO"
        # study
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = date.strftime("%Y%m%d")
        ds.StudyTime = t0.strftime("%H%M%S")
        ds.ReferringPhysicianName = ""
        ds.StudyID = accession[-8:]
        ds.AccessionNumber = accession
        ds.StudyDescription = "CT HEAD WO CONTRAST"
        # series
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDate = ds.StudyDate
        ds.SeriesTime = (t0 + dt.timedelta(seconds=30)).strftime("%H%M%S")
        ds.SeriesDescription = desc
        ds.BodyPartExamined = "HEAD"
        ds.PatientPosition = "HFS"
        # frame of reference / equipment
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "TRIAGE-AGENT SYNTHETIC"
        ds.ManufacturerModelName = "synth" if site == "train" else f"synth-site-{site}"
        ds.SoftwareVersions = f"synth-v{case.meta.get('version', 1)}"
        ds.InstitutionName = "SYNTHETIC DATA - NOT A PATIENT"
        ds.StationName = "SYNTHCT"
        # general image / acquisition
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.AcquisitionDate = ds.StudyDate
        ds.AcquisitionTime = ds.SeriesTime
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = ds.SeriesTime
        ds.BurnedInAnnotation = "NO"
        # image plane: LPS; slice k at table position z0 + k*dz (dz / cos(tilt) when tilted)
        z = z0 + k * table_step + table_z
        if tilt:
            ds.ImageOrientationPatient = [1, 0, 0, 0, round(cos_t, 8), round(sin_t, 8)]
        else:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), round(z, 4)]
        ds.SliceLocation = round(z, 4)
        ds.PixelSpacing = [round(dy, 6), round(dx, 6)]
        ds.SliceThickness = round(thickness, 3)
        ds.SpacingBetweenSlices = round(dz, 3)
        # CT image
        ds.KVP = kvp
        ds.XRayTubeCurrent = ma
        ds.ExposureTime = 1000
        ds.ConvolutionKernel = kernel
        ds.ReconstructionDiameter = round(dx * nx, 3)
        ds.DataCollectionDiameter = 500
        ds.GantryDetectorTilt = round(tilt, 2)
        ds.ScanOptions = "HELICAL MODE"
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = slope
        ds.RescaleType = "HU"
        ds.WindowCenter = [40, 600]
        ds.WindowWidth = [80, 2800]
        ds.WindowCenterWidthExplanation = ["BRAIN", "BONE"]
        # image pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.BitsAllocated = 16
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 1 if signed else 0
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        ds["PixelData"].VR = "OW"

        path = out_dir / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)

    if write_mask:
        np.savez_compressed(
            out_dir / MASK_FILE,
            mask=case.lesion_mask.astype(bool),
            spacing_mm=np.asarray(case.spacing_mm, dtype=float),
        )
        info = {
            "label": case.label,
            "subtle": bool(case.subtle),
            "seed": int(case.seed),
            "series_instance_uid": series_uid,
            "study_instance_uid": study_uid,
            "n_slices": int(nz),
            "encoding": enc_name,
            "kernel": kernel,
            "site": case.meta.get("site", "train"),
            "gantry_tilt_deg": tilt,
            "lesion_voxels": int(case.lesion_mask.sum()),
            "meta": case.meta,
        }
        (out_dir / META_FILE).write_text(json.dumps(info, indent=1, default=str))
    log.debug("wrote %d slices (%s, %s)", nz, enc_name, case.label)
    return paths
