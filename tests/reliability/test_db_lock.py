"""The database locked from outside (a backup tool, an admin's sqlite3 shell): associations are
still accepted at once, C-ECHO answers in under a second, a C-STORE that cannot commit gets
0xA700 within [storage] store_commit_timeout_s (never after the modality has given up), and once
the lock is gone nothing acknowledged and no audit event is lost."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from tests.conftest import Node
from tests.factories import CT, make_series
from tests.reliability.conftest import Ledger, reconcile, record, size
from triage_agent.models import Event

pytestmark = pytest.mark.reliability

COMMIT_TIMEOUT_S = 10.0  # the default of [storage] store_commit_timeout_s


def _echo(port: int) -> tuple[float, int | None]:
    """One association with one C-ECHO: (seconds from connect to the answer, status or None)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    t0 = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    if not assoc.is_established:
        return time.perf_counter() - t0, None
    try:
        rsp = assoc.send_c_echo()
        return time.perf_counter() - t0, getattr(rsp, "Status", None)
    finally:
        if assoc.is_established:
            assoc.release()


def _store(port: int, path: Path, ledger: Ledger) -> tuple[float, int | None]:
    """One association with one C-STORE: (seconds to the answer, status or None)."""
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30  # a modality's usual limit
    t0 = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    if not assoc.is_established:
        return time.perf_counter() - t0, None
    try:
        rsp = assoc.send_c_store(ds)
        status = getattr(rsp, "Status", None)
        if status == 0x0000:
            import hashlib

            with ledger.lock:
                ledger.acked[ds.SOPInstanceUID] = hashlib.sha256(ds.PixelData).hexdigest()
        return time.perf_counter() - t0, status
    finally:
        if assoc.is_established:
            assoc.release()


def test_db_lock(node_factory: Any, tmp_path: Path) -> None:
    lock_s = size(14, 20)  # longer than a store may wait, so today's stall would show
    node: Node = node_factory(series={"quiet_period_s": 2.0}).start()
    db_path = make_url(node.db_url).database
    assert db_path
    files = make_series(tmp_path / "ct", n=size(10, 40), seed=31, size=64)
    ledger = Ledger()
    associations = 0

    ledger.send(node.port, files[:2])  # before the lock: the node works
    associations += 1

    t0 = time.perf_counter()
    locked, released = threading.Event(), threading.Event()

    def hold_lock() -> None:  # an admin's `sqlite3 triage.db` with `BEGIN EXCLUSIVE;`
        holder = sqlite3.connect(db_path, timeout=30, isolation_level=None,
                                 check_same_thread=False)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            locked.set()
            time.sleep(lock_s)
            holder.execute("ROLLBACK")
        finally:
            holder.close()
            released.set()

    echoes: list[tuple[float, int | None]] = []
    stores: list[tuple[float, int | None]] = []
    lock_thread = threading.Thread(target=hold_lock)
    lock_thread.start()
    assert locked.wait(30)
    locked_at = time.perf_counter()
    storer = threading.Thread(target=lambda: stores.append(_store(node.port, files[2], ledger)))
    storer.start()
    associations += 1
    # Echoes across the whole lock, while the store waits on the database.
    while time.perf_counter() - locked_at < lock_s - 1.5:
        echoes.append(_echo(node.port))
        associations += 1
        time.sleep(1.0)
    storer.join(max(0.0, lock_s - (time.perf_counter() - locked_at)))
    answered_during_lock = not storer.is_alive() and not released.is_set()
    lock_thread.join()
    storer.join(60)

    # After the lock: the whole series (the refused instance again too) stores.
    ledger.send(node.port, files[2:])
    associations += 1
    out = reconcile(node, ledger)

    accepted = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the audit writer replays what waited for the lock
        with node.session()() as s:
            accepted = s.scalar(select(func.count()).select_from(Event)
                                .where(Event.kind == "association_accepted")) or 0
        if accepted >= associations:
            break
        time.sleep(0.5)
    with node.session()() as s:
        refused_audited = s.scalar(select(func.count()).select_from(Event)
                                   .where(Event.status == 0xA700)) or 0
    slowest_echo = max(t for t, _ in echoes)
    store_s, store_status = stores[0] if stores else (float("inf"), None)
    record("db-lock", len(echoes), ledger, out, time.perf_counter() - t0,
           f"SQLite locked {lock_s} s: slowest of {len(echoes)} C-ECHOs {slowest_echo:.2f} s, "
           f"C-STORE answered "
           f"{'?' if store_status is None else f'0x{store_status:04X}'} after {store_s:.1f} s, "
           f"audit association_accepted {accepted}/{associations}")

    assert answered_during_lock, "the C-STORE was still waiting when the lock ended"
    assert all(status == 0x0000 for _, status in echoes), echoes
    assert slowest_echo < 1.0, echoes
    assert store_status in (0x0000, 0xA700), stores
    assert store_s < COMMIT_TIMEOUT_S + 2, stores
    if store_status == 0xA700:
        assert refused_audited >= 1  # the refusal's audit row waited for the lock, not the store
    assert accepted == associations
    assert len(ledger.acked) == len(files)
    assert out == {"lost": 0, "duplicates": 0, "tmp_left": 0}
    spool = node.storage_root / "audit-spool.jsonl"
    assert not spool.exists() or not spool.read_text().strip()  # everything replayed
