"""The ledger oracle and the summary table for the reliability scenarios (docs/reliability.md).

Every scenario sends through ``Ledger`` senders, which remember each instance that got Success,
then calls ``reconcile``: each acknowledged instance has exactly one row, a file inside the
storage root whose SHA-256 matches the row and whose pixels match what was sent; no temp files
remain. ``RELIABILITY_FULL=1`` runs the full sizes (the README's figures); without it the same
scenarios run small enough for CI.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import select

from tests.factories import CT
from triage_agent import pynetdicom_compat

FULL = os.environ.get("RELIABILITY_FULL") == "1"
RESULTS: list[dict[str, Any]] = []


def size(quick: int, full: int) -> int:
    return full if FULL else quick


@dataclass
class Ledger:
    """Instances acknowledged with Success, keyed by SOP Instance UID -> sha256 of pixel data."""

    acked: dict[str, str] = field(default_factory=dict)
    failures: int = 0
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, port: int, files: list[Path], *, calling: str = "MODALITY",
             stop: threading.Event | None = None, timeout_s: float = 30) -> None:
        """One association, files in order; stops at the first failure or when ``stop`` is set."""
        ae = AE(ae_title=calling)
        ae.add_requested_context(CT, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
        try:
            assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
        except Exception:
            with self.lock:
                self.failures += 1
            return
        if not assoc.is_established:
            with self.lock:
                self.failures += 1
            return
        # a modality's answers must not get lost in pynetdicom's requestor (see that function)
        pynetdicom_compat.keep_responses_for_the_caller(assoc)
        try:
            for f in files:
                if stop is not None and stop.is_set():
                    break
                ds = pydicom.dcmread(f)
                t0 = time.perf_counter()
                try:
                    rsp = assoc.send_c_store(ds)
                except Exception:
                    with self.lock:
                        self.failures += 1
                    break
                dt = time.perf_counter() - t0
                status = getattr(rsp, "Status", None)
                with self.lock:
                    if status == 0x0000:
                        self.acked[ds.SOPInstanceUID] = hashlib.sha256(ds.PixelData).hexdigest()
                        self.latencies.append(dt)
                    else:
                        self.failures += 1
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()


def reconcile(node: Any, ledger: Ledger) -> dict[str, int]:
    """lost = acknowledged but missing or corrupt; duplicates = more than one row per UID."""
    from triage_agent.models import Instance

    with node.session()() as s:
        rows = s.execute(select(Instance.sop_instance_uid, Instance.path, Instance.sha256)).all()
    by_uid: dict[str, list[tuple[str, str]]] = {}
    for uid, path, sha in rows:
        by_uid.setdefault(uid, []).append((path, sha))
    lost = dups = 0
    root = node.storage_root.resolve()
    for uid, pixel_sha in ledger.acked.items():
        entries = by_uid.get(uid, [])
        if len(entries) > 1:
            dups += 1
        if not entries:
            lost += 1
            continue
        path, sha = entries[0]
        p = (root / path).resolve()
        if not p.is_relative_to(root) or not p.exists():
            lost += 1
            continue
        data = p.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            lost += 1
            continue
        if hashlib.sha256(pydicom.dcmread(p).PixelData).hexdigest() != pixel_sha:
            lost += 1
    tmp_left = len(list((root / "tmp").glob("*"))) if (root / "tmp").exists() else 0
    return {"lost": lost, "duplicates": dups, "tmp_left": tmp_left}


def record(scenario: str, rounds: int, ledger: Ledger | None, outcome: dict[str, int],
           seconds: float, note: str = "") -> None:
    RESULTS.append({
        "scenario": scenario, "rounds": rounds,
        "acknowledged": len(ledger.acked) if ledger else 0,
        "lost": outcome.get("lost", 0), "duplicates": outcome.get("duplicates", 0),
        "failures": ledger.failures if ledger else outcome.get("failures", 0),
        "seconds": round(seconds, 1), "note": note,
    })


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section(f"reliability summary ({'full' if FULL else 'quick'} sizes)")
    hdr = (f"{'scenario':10} {'rounds':>6} {'acked':>7} {'lost':>5} {'dups':>5} "
           f"{'failures':>8} {'time s':>7}  note")
    tr.write_line(hdr)
    tr.write_line("-" * len(hdr))
    for r in RESULTS:
        tr.write_line(f"{r['scenario']:10} {r['rounds']:>6} {r['acknowledged']:>7} {r['lost']:>5} "
                      f"{r['duplicates']:>5} {r['failures']:>8} {r['seconds']:>7}  {r['note']}")
    out = os.environ.get("RELIABILITY_REPORT")
    if out:
        import json

        Path(out).write_text(json.dumps(RESULTS, indent=1))


@pytest.fixture(params=["sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Reliability scenarios run on the embedded default (SQLite) unless parametrised."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'triage.db'}"
    return request.getfixturevalue("pg_server").new_database()
