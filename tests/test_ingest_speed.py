"""The short store path: its own file meta encoder, one transaction per instance of a series
being received, and a duplicate check that does not wait for the database's writer."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID
from sqlalchemy import select, update

from tests.factories import make_series
from triage_agent import db, ingest
from triage_agent.models import Instance, Series, SeriesState
from triage_agent.storage import Storage
from triage_agent.transfer_syntax import ACCEPTED_TRANSFER_SYNTAXES


@pytest.fixture
def node_db(tmp_path: Path) -> Iterator[tuple[Path, Any, Storage]]:
    path = tmp_path / "triage.db"
    url = f"sqlite:///{path}"
    db.upgrade(url)
    engine = db.make_engine(url)
    db.check_connection(engine)  # WAL mode, as at the node's start
    yield path, db.session_factory(engine), Storage(tmp_path / "storage")
    engine.dispose()


def pydicom_preamble(info: ingest.InstanceInfo) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(info.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(info.sop_instance_uid)
    meta.TransferSyntaxUID = UID(info.transfer_syntax_uid)
    meta.ImplementationClassUID = UID(ingest.IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = "TRIAGE_AGENT_01"
    buf = DicomBytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


@pytest.mark.parametrize("sop_uid", ["1.2.3", "1.2.34", "2.25." + "9" * 59])
def test_file_meta_matches_pydicom_byte_for_byte(sop_uid: str) -> None:
    """Files stored before keep their digests: a resent instance is a duplicate, not a
    conflict."""
    for ts in ACCEPTED_TRANSFER_SYNTAXES:
        info = ingest.InstanceInfo("1.2.840.10008.5.1.4.1.1.2", sop_uid, "1.2", "1.3", str(ts))
        assert ingest._file_preamble(info) == pydicom_preamble(info)


def infos(tmp_path: Path, n: int) -> list[tuple[ingest.InstanceInfo, bytes]]:
    """Each slice's facts and its dataset as a sender sends it (Explicit VR Little Endian)."""
    out = []
    for f in make_series(tmp_path / "ct", n=n, seed=3, size=32):
        ds = pydicom.dcmread(f)
        info = ingest.inspect_dataset(ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                      "1.2.840.10008.1.2.1")
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_dataset(buf, ds)
        out.append((info, buf.getvalue()))
    return out


def series_row(sessions: Any) -> Series:
    with sessions() as s:
        return s.scalars(select(Series)).one()


def test_counts_dedup_and_reopen(node_db: Any, tmp_path: Path) -> None:
    _, sessions, storage = node_db
    items = infos(tmp_path, 4)
    for info, data in items[:3]:
        assert ingest.persist(storage, sessions, info, data) == "stored"
    row = series_row(sessions)
    assert (row.instance_count, row.frame_count, row.state) == (3, 3, SeriesState.RECEIVING)
    assert ingest.persist(storage, sessions, *items[0]) == "duplicate"
    with sessions() as s, s.begin():
        s.execute(update(Series).values(state=SeriesState.SCORED))
    assert ingest.persist(storage, sessions, *items[3]) == "stored"  # a late slice reopens
    row = series_row(sessions)
    assert (row.instance_count, row.state) == (4, SeriesState.RECEIVING)
    with sessions() as s:
        for inst in s.scalars(select(Instance)):
            data = (storage.root / inst.path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == inst.sha256


def test_same_instance_from_two_associations_at_once_is_counted_once(
        node_db: Any, tmp_path: Path) -> None:
    _, sessions, storage = node_db
    items = infos(tmp_path, 2)
    assert ingest.persist(storage, sessions, *items[0]) == "stored"  # the series exists
    outcomes: list[str] = []
    start = threading.Barrier(4)

    def store() -> None:
        start.wait()
        outcomes.append(ingest.persist(storage, sessions, *items[1]))

    threads = [threading.Thread(target=store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["duplicate"] * 3 + ["stored"]
    assert series_row(sessions).instance_count == 2


def test_resent_instance_is_acknowledged_while_another_writer_holds_the_database(
        node_db: Any, tmp_path: Path) -> None:
    path, sessions, storage = node_db
    info, data = infos(tmp_path, 1)[0]
    assert ingest.persist(storage, sessions, info, data) == "stored"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")  # e.g. the scheduler's sweep
    try:
        t0 = time.perf_counter()
        with db.lock_wait_deadline(5.0):
            assert ingest.persist(storage, sessions, info, data) == "duplicate"
        assert time.perf_counter() - t0 < 2.0
    finally:
        writer.execute("ROLLBACK")
        writer.close()
