"""From a received dataset to a durable file and committed rows (no networking here).

Split from the receiver so that the same path can be driven by tests and the fuzz harness without
a socket.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pydicom.dataset import Dataset
from sqlalchemy import CursorResult, Engine, Table, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from triage_agent import db
from triage_agent.dicom_uids import IMAGE_SOP_CLASSES, image_facts, valid_uid
from triage_agent.models import (
    Event,
    Instance,
    Job,
    JobState,
    Series,
    SeriesState,
    Study,
    utcnow,
)
from triage_agent.storage import Storage, content_digest

log = logging.getLogger(__name__)

MAX_ROWS_COLS = 4096
MAX_FRAMES = 4096


class DatasetMismatch(ValueError):
    """The dataset contradicts its request or lacks what a stored image needs."""


class InvalidUID(ValueError):
    """A UID in the dataset is not a DICOM UID (digits and dots, at most 64 characters)."""


def short_id(uid: str | None) -> str:
    """A stable, non-identifying handle for logs (UIDs can embed dates and site roots)."""
    return hashlib.sha256((uid or "").encode()).hexdigest()[:12] if uid else "-"


@dataclass
class InstanceInfo:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None = None
    body_part: str | None = None
    series_description: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    slice_thickness_mm: float | None = None
    orientation: str | None = None
    convolution_kernel: str | None = None
    frames: int = 1
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    calling_ae: str | None = None
    source_address: str | None = None

    @property
    def log_id(self) -> str:
        return short_id(self.sop_instance_uid)


def _str(ds: Dataset, keyword: str, maxlen: int = 64) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)[:maxlen]


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def classify_orientation(iop: Any) -> str | None:
    """axial / coronal / sagittal / oblique from ImageOrientationPatient (or None)."""
    try:
        r = [float(v) for v in iop]
    except (TypeError, ValueError):
        return None
    if len(r) != 6:
        return None
    n = (r[1] * r[5] - r[2] * r[4], r[2] * r[3] - r[0] * r[5], r[0] * r[4] - r[1] * r[3])
    norm = math.sqrt(sum(v * v for v in n)) or 1.0
    axis = max(range(3), key=lambda i: abs(n[i]))
    cos = abs(n[axis]) / norm
    name = ("sagittal", "coronal", "axial")[axis]
    # Keep the angle so the selection rule can apply its own tolerance.
    angle = math.degrees(math.acos(min(1.0, cos)))
    return f"{name}:{angle:.1f}"


def _check_pixels(ds: Dataset, ts: str) -> None:
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    bits = _int(ds, "BitsAllocated")
    spp = _int(ds, "SamplesPerPixel") or 1
    frames = _int(ds, "NumberOfFrames") or 1
    if rows is None or cols is None or bits is None:
        raise DatasetMismatch("image without Rows/Columns/BitsAllocated")
    if not (0 < rows <= MAX_ROWS_COLS and 0 < cols <= MAX_ROWS_COLS and 0 < frames <= MAX_FRAMES):
        raise DatasetMismatch(f"absurd image size {rows}x{cols}x{frames}")
    if bits not in (8, 16, 32):
        raise DatasetMismatch(f"unsupported BitsAllocated {bits}")
    if "PixelData" not in ds:
        raise DatasetMismatch("image without Pixel Data")
    data = ds.PixelData
    compressed = ts not in (
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
    )
    if not compressed:
        expected = rows * cols * frames * spp * bits // 8
        if len(data) not in (expected, expected + 1):  # one pad byte for odd lengths
            raise DatasetMismatch(
                f"Pixel Data is {len(data)} bytes, Rows x Columns needs {expected}"
            )


def inspect_dataset(ds: Dataset, sop_class: str, sop_uid: str, ts: str) -> InstanceInfo:
    """Decode what we need and check it against the request. Raises on anything unusable."""
    ds_class = str(ds.get("SOPClassUID", ""))
    ds_uid = str(ds.get("SOPInstanceUID", ""))
    if ds_class != sop_class or ds_uid != sop_uid:
        raise DatasetMismatch("SOP Class/Instance UID in dataset differs from the request")
    study_uid = str(ds.get("StudyInstanceUID", ""))
    series_uid = str(ds.get("SeriesInstanceUID", ""))
    for name, value in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid)):
        if not value:
            raise DatasetMismatch(f"missing {name}")
        if not valid_uid(value):
            raise InvalidUID(f"{name} is not a valid UID")
    if sop_class in IMAGE_SOP_CLASSES:
        _check_pixels(ds, ts)
    # Touch every element once so a truncated or corrupt dataset fails here, not in a worker.
    for elem in ds.iterall():
        _ = elem.value
    facts = image_facts(ds)  # classic or enhanced (functional groups) CT
    thickness, iop = facts.slice_thickness_mm, facts.orientation
    return InstanceInfo(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_uid,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        transfer_syntax_uid=ts,
        modality=_str(ds, "Modality", 16),
        body_part=facts.body_part,
        series_description=_str(ds, "SeriesDescription", 64),
        series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"),
        slice_thickness_mm=thickness,
        orientation=classify_orientation(iop) if iop is not None else None,
        convolution_kernel=facts.kernel,
        frames=facts.frames,
        patient_id=_str(ds, "PatientID", 64),
        patient_name=_str(ds, "PatientName", 324),
        accession_number=_str(ds, "AccessionNumber", 16),
        study_date=_str(ds, "StudyDate", 8),
        study_description=_str(ds, "StudyDescription", 64),
    )


def _insert(session: Session) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def audit(sessions: sessionmaker[Session], kind: str, **fields: Any) -> None:
    """Append an audit event in its own transaction; never raises into the caller."""
    try:
        with sessions() as s, s.begin():
            s.add(Event(kind=kind, **fields))
    except Exception:  # the audit trail must not take the receiver down with it
        log.exception("could not write audit event %s", kind)


def _upsert_series(session: Session, info: InstanceInfo, ignored: bool) -> Series:
    ins = _insert(session)
    session.execute(
        ins(Study)
        .values(
            study_instance_uid=info.study_instance_uid,
            patient_id=info.patient_id,
            patient_name=info.patient_name,
            accession_number=info.accession_number,
            study_date=info.study_date,
            study_description=info.study_description,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["study_instance_uid"])
    )
    study_id = session.scalar(
        select(Study.id).where(Study.study_instance_uid == info.study_instance_uid)
    )
    now = utcnow()
    session.execute(
        ins(Series)
        .values(
            series_instance_uid=info.series_instance_uid,
            study_id=study_id,
            modality=info.modality,
            sop_class_uid=info.sop_class_uid,
            body_part=info.body_part,
            series_description=info.series_description,
            series_number=info.series_number,
            slice_thickness_mm=info.slice_thickness_mm,
            orientation=info.orientation,
            convolution_kernel=info.convolution_kernel,
            state=SeriesState.RECEIVING,
            reason=None,
            instance_count=0,
            first_received_at=now,
            last_received_at=now,
            generation=0,
        )
        .on_conflict_do_nothing(index_elements=["series_instance_uid"])
    )
    series = session.scalars(
        select(Series)
        .where(Series.series_instance_uid == info.series_instance_uid)
        .with_for_update()
    ).one()
    return series


# The statements of the common case, built once (SQLAlchemy then reuses their compiled form
# instead of building, hashing and compiling a statement per instance).
_STORED_DIGEST = (
    select(Instance.sha256).where(Instance.sop_instance_uid == bindparam("sop_instance_uid"))
)
_SERIES = cast(Table, Series.__table__)
_INSTANCES = cast(Table, Instance.__table__)
_COUNT_INSTANCE = (
    update(_SERIES)
    .where(_SERIES.c.series_instance_uid == bindparam("series_uid"),
           _SERIES.c.state == SeriesState.RECEIVING)
    .values(instance_count=_SERIES.c.instance_count + 1,
            frame_count=_SERIES.c.frame_count + bindparam("frames"),
            last_received_at=bindparam("now"))
    .returning(_SERIES.c.id)
)
_INSTANCE_COLUMNS = ("sop_instance_uid", "sop_class_uid", "series_id", "path", "sha256",
                     "size_bytes", "transfer_syntax_uid", "instance_number", "calling_ae",
                     "source_address", "received_at")
_INSERT_INSTANCE = {
    name: insert(_INSTANCES)
    .values({c: bindparam(c) for c in _INSTANCE_COLUMNS})
    .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
    for name, insert in (("postgresql", postgresql.insert), ("sqlite", sqlite.insert))
}


class _NotAppendable(Exception):
    """The common case does not apply; the general path takes the instance."""


def _engine(sessions: sessionmaker[Session]) -> Engine:
    """The engine behind a session factory (the common case runs on a bare connection: no ORM
    session to build and tear down per instance)."""
    return cast(Engine, sessions.kw["bind"])


def _stored_digest(sessions: sessionmaker[Session], sop_instance_uid: str) -> str | None:
    """The SHA-256 of the instance already stored under this UID, or None."""
    engine = _engine(sessions).execution_options(**{db.READ_ONLY: True})
    with engine.begin() as conn:
        return cast(str | None, conn.execute(
            _STORED_DIGEST, {"sop_instance_uid": sop_instance_uid}).scalar())


def _append_to_receiving_series(sessions: sessionmaker[Session], info: InstanceInfo,
                                relpath: str | None, digest: str, size: int) -> bool:
    """The common case in one short transaction: the series exists and is still receiving, the
    UID is new. Counts the instance and inserts its row, commits; returns False (nothing
    changed) when the case does not apply."""
    now = utcnow()
    try:
        with _engine(sessions).begin() as conn:
            series_id = conn.execute(_COUNT_INSTANCE, {
                "series_uid": info.series_instance_uid, "frames": info.frames, "now": now,
            }).scalar()
            if series_id is None:  # new series, or one completed (the general path reopens it)
                raise _NotAppendable
            inserted = conn.execute(_INSERT_INSTANCE[conn.dialect.name], {
                "sop_instance_uid": info.sop_instance_uid, "sop_class_uid": info.sop_class_uid,
                "series_id": series_id, "path": relpath, "sha256": digest, "size_bytes": size,
                "transfer_syntax_uid": info.transfer_syntax_uid,
                "instance_number": info.instance_number, "calling_ae": info.calling_ae,
                "source_address": info.source_address, "received_at": now,
            }).rowcount
            if not inserted:  # a concurrent association stored the UID first: undo the count
                raise _NotAppendable
    except _NotAppendable:
        return False
    return True


def persist(
    storage: Storage,
    sessions: sessionmaker[Session],
    info: InstanceInfo,
    dataset_bytes: bytes,
    *,
    ignored: bool = False,
    audit_event: Callable[..., None] | None = None,
) -> str:
    """Write and record one instance. Returns "stored", "duplicate" or "quarantined".

    Success may be sent only after this returns: the file and its directory entry are fsynced
    and the row is committed. ``audit_event(kind, **fields)`` records a conflict (the receiver
    passes its AuditLog's, which never waits for the database); default: ``audit``.

    When the row cannot commit (an error, or the caller's ``db.lock_wait_deadline`` passed) this
    raises and nothing half-done is visible: no row, and at most a complete file under its
    content name that no row points to, which the sender's retry of the instance takes over.
    """
    record = audit_event or functools.partial(audit, sessions)
    chunks = [_file_preamble(info), dataset_bytes]
    digest = content_digest(chunks)
    existing = _stored_digest(sessions, info.sop_instance_uid)
    if existing is not None:
        return _duplicate(storage, record, info, chunks, digest, existing)

    relpath = None
    if not ignored:
        relpath = storage.instance_relpath(info.study_instance_uid, info.series_instance_uid, digest)
        storage.write_atomic(relpath, chunks)

    if _append_to_receiving_series(sessions, info, relpath, digest,
                                   sum(len(c) for c in chunks)):
        return "stored"
    with sessions() as s, s.begin():
        series = _upsert_series(s, info, ignored)
        ins = _insert(s)
        inserted = cast(CursorResult[Any], s.execute(
            ins(Instance)
            .values(
                sop_instance_uid=info.sop_instance_uid,
                sop_class_uid=info.sop_class_uid,
                series_id=series.id,
                path=relpath,
                sha256=digest,
                size_bytes=sum(len(c) for c in chunks),
                transfer_syntax_uid=info.transfer_syntax_uid,
                instance_number=info.instance_number,
                calling_ae=info.calling_ae,
                source_address=info.source_address,
                received_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
        )).rowcount
        if inserted:
            values: dict[str, Any] = {
                "instance_count": Series.instance_count + 1,
                "frame_count": Series.frame_count + info.frames,
                "last_received_at": utcnow(),
            }
            if series.state != SeriesState.RECEIVING:
                # Late slices: reopen; the next completion queues a re-run (a new generation).
                values.update(state=SeriesState.RECEIVING, reason=None, completed_at=None)
                s.execute(
                    update(Job)
                    .where(Job.series_id == series.id, Job.state == JobState.QUEUED)
                    .values(state=JobState.CANCELLED, last_error="superseded by late instances")
                )
                s.add(Event(kind="series_reopened",
                            series_instance_uid=info.series_instance_uid,
                            study_instance_uid=info.study_instance_uid,
                            detail=f"was {series.state}"))
            s.execute(update(Series).where(Series.id == series.id).values(**values))
            return "stored"
    # Lost a race with a concurrent association sending the same UID.
    existing = _stored_digest(sessions, info.sop_instance_uid)
    if existing == digest:
        return "duplicate"
    if relpath is not None:
        storage.remove(relpath)
    return _duplicate(storage, record, info, chunks, digest, existing or "")


def _duplicate(
    storage: Storage,
    record: Callable[..., None],
    info: InstanceInfo,
    chunks: list[bytes],
    digest: str,
    existing: str,
) -> str:
    if existing == digest:
        return "duplicate"
    # Same UID, other content: keep the first, keep the second aside for a human, audit it.
    relpath = storage.quarantine_relpath(digest)
    storage.write_atomic(relpath, chunks)
    log.warning("instance %s: same UID with different content quarantined", info.log_id)
    record(
        "instance_conflict",
        calling_ae=info.calling_ae,
        source_address=info.source_address,
        study_instance_uid=info.study_instance_uid,
        series_instance_uid=info.series_instance_uid,
        sop_instance_uid=info.sop_instance_uid,
        detail=f"kept first copy {existing[:16]}, quarantined {relpath}",
        flagged=True,
    )
    return "quarantined"


def _file_preamble(info: InstanceInfo) -> bytes:
    """128-byte preamble, DICM and the file meta group for a Part 10 file.

    Depends only on the SOP class/instance and transfer syntax, so the same dataset from two
    senders gives byte-identical files and one digest. Encoded here (Explicit VR Little Endian,
    PS3.10 7.1) rather than through pydicom's writer, which costs milliseconds per instance;
    tests/test_ingest_speed.py checks that both give the same bytes.
    """
    body = b"".join((
        _OB_VERSION,
        _meta_element(0x0002, b"UI", _uid_bytes(info.sop_class_uid)),
        _meta_element(0x0003, b"UI", _uid_bytes(info.sop_instance_uid)),
        _meta_element(0x0010, b"UI", _uid_bytes(info.transfer_syntax_uid)),
        _IMPLEMENTATION,
    ))
    return _PREFIX + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """A group 0002 element with a 2-byte length (UI, SH, UL)."""
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def _uid_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.75006884747854523615841001"
_PREFIX = b"\0" * 128 + b"DICM"
# File Meta Information Version (0002,0001) OB 00 01, then the implementation's class UID and
# version name (0002,0012) and (0002,0013): the same in every file.
_OB_VERSION = struct.pack("<HH", 0x0002, 0x0001) + b"OB\0\0" + struct.pack("<I", 2) + b"\0\1"
_IMPLEMENTATION = (_meta_element(0x0012, b"UI", _uid_bytes(IMPLEMENTATION_CLASS_UID))
                   + _meta_element(0x0013, b"SH", b"TRIAGE_AGENT_01 "))
