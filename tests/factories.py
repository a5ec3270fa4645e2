"""Small seeded DICOM factories for node tests and benchmarks (not the realistic synth)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
CANARY_NAME = "CANARY^PHIPATIENT"
CANARY_ID = "PHICANARY123"


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def set_ct_pixels(ds: Dataset, size: int, rng: np.random.Generator) -> None:
    """The image attributes every synthetic test slice shares: ``size`` x ``size`` 16-bit signed
    pixels with rescale slope 1 / intercept -1024, filled from ``rng``."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = rng.integers(0, 2000, (size, size), dtype=np.int16).tobytes()


def make_series(
    out: Path,
    *,
    n: int = 40,
    seed: int = 0,
    size: int = 512,
    modality: str = "CT",
    orientation: str = "axial",
    thickness: float = 5.0,
    description: str = "HEAD W/O 5mm",
    study_uid: str | None = None,
) -> list[Path]:
    """Write ``n`` slices of one series (16-bit, rescale slope/intercept) and return the paths."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or _uid("study", seed)
    series_uid = _uid("series", seed, modality, orientation)
    iop = {
        "axial": [1, 0, 0, 0, 1, 0],
        "coronal": [1, 0, 0, 0, 0, -1],
        "sagittal": [0, 1, 0, 0, 0, -1],
    }[orientation]
    paths = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        sop_class = CT if modality == "CT" else MR
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = _uid("sop", seed, modality, orientation, i)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = _uid("for", seed)
        ds.PatientName = CANARY_NAME
        ds.PatientID = CANARY_ID
        ds.PatientBirthDate = "19500101"
        ds.PatientSex = "O"
        ds.StudyDate = "20261126"
        ds.StudyTime = "120000"
        ds.AccessionNumber = f"ACC{seed}"
        ds.StudyID = "1"
        ds.Modality = modality
        ds.BodyPartExamined = "HEAD"
        ds.SeriesDescription = description
        ds.SeriesNumber = 2
        ds.InstanceNumber = i + 1
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [-125.0, -125.0, float(i) * thickness]
        ds.SliceThickness = thickness
        ds.PixelSpacing = [0.488, 0.488]
        set_ct_pixels(ds, size, rng)
        p = out / f"slice_{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
