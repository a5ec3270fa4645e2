"""Shared pieces of the fuzz harnesses: seed datasets, encoders and hypothesis strategies.

Everything here builds *inputs*; the oracles live in ``fuzz_ingest.py`` and ``fuzz_network.py``.
"""

from __future__ import annotations

import contextlib
import copy
import struct
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pynetdicom.dsutils import encode

from tests.factories import CANARY_ID, CANARY_NAME, set_ct_pixels

REPO = Path(__file__).resolve().parent.parent
CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
MR = "1.2.840.10008.5.1.4.1.1.4"  # configured as an "extra" (ignored) SOP class in the harnesses
US = "1.2.840.10008.5.1.4.1.1.6.1"  # not accepted at all
SR = "1.2.840.10008.5.1.4.1.1.88.22"
TRANSFER_SYNTAXES: list[str] = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                     RLELossless]


def ts_flags(ts: str) -> tuple[bool, bool]:
    """(is_implicit_VR, is_little_endian) as pynetdicom uses them to decode a C-STORE dataset."""
    return ts == ImplicitVRLittleEndian, ts != ExplicitVRBigEndian


def base_dataset(i: int = 0, size: int = 8, z: float = 0.0, sop_class: str = CT) -> Dataset:
    """A small valid CT slice (16-bit signed, rescaled) like tests.factories.make_series."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.1.{i + 1}"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3.1"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.4.1"
    ds.PatientName = CANARY_NAME
    ds.PatientID = CANARY_ID
    ds.StudyDate = "20261126"
    ds.AccessionNumber = "ACC1"
    ds.Modality = "CT"
    ds.BodyPartExamined = "HEAD"
    ds.SeriesDescription = "HEAD W/O 5mm"
    ds.SeriesNumber = 2
    ds.InstanceNumber = i + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-2.0, -2.0, z]
    ds.SliceThickness = 5.0
    ds.PixelSpacing = [0.5, 0.5]
    set_ct_pixels(ds, size, np.random.default_rng(i))
    ds["PixelData"].VR = "OW"
    return ds


def encode_for(ds: Dataset, ts: str) -> bytes | None:
    """Encode ``ds`` as a C-STORE data set in ``ts`` (RLE compresses Pixel Data first)."""
    ds = copy.deepcopy(ds)
    if ts == RLELossless:
        try:
            from pydicom.dataset import FileMetaDataset

            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
        except Exception:  # noqa: BLE001 - the mutated dataset cannot be compressed; send raw
            pass
        with contextlib.suppress(AttributeError):
            del ds.file_meta
    elif ts == ExplicitVRBigEndian and "PixelData" in ds and ds["PixelData"].VR == "OW":
        # pydicom writes OW bytes as they are: swap 16-bit words like a big-endian sender would
        raw = ds.PixelData
        if len(raw) % 2 == 0:
            ds.PixelData = np.frombuffer(raw, "<u2").astype(">u2").tobytes()
    implicit, little = ts_flags(ts)
    try:
        return encode(ds, implicit, little)
    except Exception:  # noqa: BLE001 - pydicom refuses to write some mutations
        return None


def deep_sequence(depth: int, implicit: bool, little: bool) -> bytes:
    """Raw bytes of (0040,0275) RequestAttributesSequence nested ``depth`` levels, undefined
    lengths (built by hand: pydicom cannot write it without recursing ``depth`` times)."""
    e = "<" if little else ">"
    tag = struct.pack(e + "HH", 0x0040, 0x0275)
    if implicit:
        open_sq = tag + struct.pack(e + "I", 0xFFFFFFFF)
    else:
        open_sq = tag + b"SQ\0\0" + struct.pack(e + "I", 0xFFFFFFFF)
    item = struct.pack(e + "HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack(e + "HHI", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack(e + "HHI", 0xFFFE, 0xE0DD, 0)
    return (open_sq + item) * depth + (item_end + seq_end) * depth


def encode_with_deep_sequence(ds: Dataset, ts: str, depth: int) -> bytes | None:
    """``ds`` encoded with a ``depth``-deep sequence spliced in at its tag position."""
    if ts == RLELossless:
        ts = ExplicitVRLittleEndian
    implicit, little = ts_flags(ts)
    split = Tag(0x0040, 0x0275)
    lo, hi = Dataset(), Dataset()
    for elem in ds:
        (lo if elem.tag < split else hi).add(elem)
    a, b = encode(lo, implicit, little), encode(hi, implicit, little)
    if a is None or b is None:
        return None
    return a + deep_sequence(depth, implicit, little) + b


# ----------------------------------------------------------------------- hypothesis strategies

def _uid_strategy() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([
            "1.2.826.0.1.3680043.8.498.9.9", "../../../../etc/passwd", "1.2.3/../../x",
            "..", "/tmp/evil", "1.2.3\n", "1.2.3\x00", "1.2.3 ", "01.2", "1..2", "", " ",
            "1." * 40 + "1", "1.2.3\\1.2.4", "1.2.3\r\n", "C:\\x", "1.2.3%00",
            "1.2.\u0663", "1.2.３",
        ]),
        st.text(alphabet="0123456789./\\\n\x00 ", max_size=80),
        st.text(max_size=70),
    )


_NUMERIC_TEXT = st.one_of(
    st.sampled_from(["", "abc", "NaN", "inf", "-inf", "1e309", "-0", "1\\2", "1\\2\\3\\4\\5\\6",
                     "0\\0\\0\\0\\0\\0", "1\\0\\0\\0\\0\\1", " 5 ", "5.0.0", "\x00",
                     CANARY_NAME, "99999999999999999999", "-1", "0", "65535", "65536"]),
    st.text(max_size=20),
)

_ELEMENTS: dict[str, st.SearchStrategy[Any]] = {
    "SOPInstanceUID": _uid_strategy(),
    "StudyInstanceUID": _uid_strategy(),
    "SeriesInstanceUID": _uid_strategy(),
    "SOPClassUID": st.one_of(st.sampled_from([CT, ENHANCED_CT, MR, US, SR]), _uid_strategy()),
    "Rows": st.one_of(st.sampled_from([0, 1, 2, 7, 8, 9, 4096, 4097, 65535]),
                      st.integers(0, 65535)),
    "Columns": st.one_of(st.sampled_from([0, 1, 2, 7, 8, 9, 4096, 4097, 65535]),
                         st.integers(0, 65535)),
    "BitsAllocated": st.sampled_from([0, 1, 8, 12, 16, 32, 64, 65535]),
    "BitsStored": st.sampled_from([0, 1, 8, 12, 16, 17, 32, 64]),
    "HighBit": st.sampled_from([0, 7, 11, 15, 31, 63, 255]),
    "SamplesPerPixel": st.sampled_from([0, 1, 3, 4, 65535]),
    "PixelRepresentation": st.sampled_from([0, 1, 2, 65535]),
    "NumberOfFrames": st.one_of(st.sampled_from(["0", "1", "2", "4096", "4097", "-1", "x", ""]),
                                st.integers(-5, 5000).map(str)),
    "PhotometricInterpretation": st.sampled_from(["MONOCHROME2", "MONOCHROME1", "RGB",
                                                  "PALETTE COLOR", "YBR_FULL", "", "XYZ"]),
    "RescaleSlope": _NUMERIC_TEXT,
    "RescaleIntercept": _NUMERIC_TEXT,
    "SliceThickness": _NUMERIC_TEXT,
    "PixelSpacing": _NUMERIC_TEXT,
    "ImageOrientationPatient": _NUMERIC_TEXT,
    "ImagePositionPatient": _NUMERIC_TEXT,
    "InstanceNumber": _NUMERIC_TEXT,
    "SeriesNumber": _NUMERIC_TEXT,
    "Modality": st.sampled_from(["CT", "MR", "", "ct", "C" * 40]),
    "PatientName": st.one_of(st.just(CANARY_NAME), st.text(max_size=400)),
    "SeriesDescription": st.text(max_size=200),
    "StudyDate": st.sampled_from(["20261126", "", "2026", "abcdefgh", "99999999"]),
}


@st.composite
def mutated_dataset(draw: st.DrawFn, *, size: int = 8) -> Dataset:
    """A small valid CT slice with a handful of targeted mutations applied."""
    ds = base_dataset(draw(st.integers(0, 3)), size=size)
    for name in draw(st.lists(st.sampled_from(sorted(_ELEMENTS)), max_size=4, unique=True)):
        action = draw(st.sampled_from(["set", "set", "set", "delete"]))
        if action == "delete":
            if name in ds:
                del ds[name]
            continue
        value = draw(_ELEMENTS[name])
        try:
            if name in ds:
                ds[name].value = value
            else:
                setattr(ds, name, value)
        except Exception:  # noqa: BLE001 - pydicom refuses some values up front; keep the base
            pass
    pix = draw(st.sampled_from(["keep", "keep", "short", "long", "odd", "empty", "delete",
                                "huge_dims", "sequence"]))
    if pix == "short" and "PixelData" in ds:
        ds.PixelData = ds.PixelData[: draw(st.integers(0, max(0, len(ds.PixelData) - 1)))]
    elif pix == "long" and "PixelData" in ds:
        ds.PixelData = ds.PixelData + b"\0" * draw(st.integers(2, 4096))
    elif pix == "odd" and "PixelData" in ds:
        ds.PixelData = ds.PixelData + b"\0"
    elif pix == "empty" and "PixelData" in ds:
        ds.PixelData = b""
    elif pix == "delete" and "PixelData" in ds:
        del ds.PixelData
    elif pix == "huge_dims":
        ds.Rows = draw(st.sampled_from([4096, 65535]))
        ds.Columns = draw(st.sampled_from([4096, 65535]))
        ds.NumberOfFrames = draw(st.sampled_from(["1", "4096"]))
    elif pix == "sequence":
        # Pixel Data replaced by a nested item (an element of the wrong kind where bytes belong)
        inner = Dataset()
        inner.PatientID = "x"
        ds.ReferencedImageSequence = DicomSequence([inner])
    if draw(st.booleans()):  # a private / unknown element with an odd VR
        vr = draw(st.sampled_from(["UN", "OB", "LO", "US", "SQ", "FD", "DS", "IS"]))
        value = draw(st.sampled_from([b"\x01\x02\x03", "x", 1, None]))
        with contextlib.suppress(Exception):  # pydicom refuses some VR/value pairs
            ds.add_new(0x00091010, vr, value)
    return ds


@st.composite
def byte_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    """Low-level corruption of an encoded data set: truncate, flip, splice, lengths."""
    kind = draw(st.sampled_from(["none", "none", "truncate", "flip", "insert", "length",
                                 "append"]))
    if not data or kind == "none":
        return data
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        b = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(b) - 1))
            b[i] = draw(st.integers(0, 255))
        return bytes(b)
    if kind == "insert":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=32)) + data[i:]
    if kind == "length":  # overwrite 4 bytes with a big length value somewhere
        i = draw(st.integers(0, max(0, len(data) - 4)))
        val = draw(st.sampled_from([0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0x10000, 0]))
        return data[:i] + struct.pack("<I", val) + data[i + 4:]
    return data + draw(st.binary(min_size=1, max_size=64))


@st.composite
def store_input(draw: st.DrawFn) -> tuple[bytes, str, str | None, str | None]:
    """(dataset bytes, transfer syntax, request SOP class, request SOP instance UID).

    ``None`` request UIDs mean "copy them from the dataset", as an SCU does.
    """
    ts = draw(st.sampled_from(TRANSFER_SYNTAXES))
    ds = draw(mutated_dataset())
    if draw(st.integers(0, 9)) == 0:
        depth = draw(st.sampled_from([2, 50, 500, 5000, 10000]))
        data = encode_with_deep_sequence(ds, ts, depth)
    else:
        data = encode_for(ds, ts)
    if data is None:
        data = encode_for(base_dataset(), ts) or b""
    data = draw(byte_mutation(data))
    req_class = draw(st.one_of(st.none(), st.sampled_from([CT, MR, US]), _uid_strategy()))
    req_uid = draw(st.one_of(st.none(), st.none(), _uid_strategy()))
    return data, ts, req_class, req_uid
