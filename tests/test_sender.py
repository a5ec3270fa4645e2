"""Delivery against real DCMTK storescp, including its fault options."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.factories import make_series
from tests.peers import StoreSCP, free_port
from triage_agent import db
from triage_agent.config import AgentConfig, DestinationConfig
from triage_agent.models import (
    Delivery,
    Job,
    Output,
    Result,
    Series,
    SeriesState,
    Study,
    utcnow,
)
from triage_agent.sender import (
    DELIVERED,
    PERMANENT,
    TRANSIENT,
    Sender,
    classify_status,
    retry_dead,
    send_files,
)
from triage_agent.storage import Storage


@pytest.mark.parametrize(
    ("status", "kind"),
    [(0x0000, DELIVERED), (0xB007, DELIVERED), (0xA700, TRANSIENT), (0xA7FF, TRANSIENT),
     (0xA900, PERMANENT), (0xC000, PERMANENT), (0x0122, PERMANENT), (0x0124, PERMANENT)],
)
def test_status_classification(status: int, kind: str) -> None:
    assert classify_status(status) == kind


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Any]:
    started: list[StoreSCP] = []

    def make(*opts: str) -> StoreSCP:
        s = StoreSCP(tmp_path / f"scp{len(started)}", *opts)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


def test_send_outcomes_against_storescp_faults(scp: Any, tmp_path: Path) -> None:
    files = make_series(tmp_path / "ct", n=2, seed=1, size=32)
    ok = scp()
    assert [o.kind for o in send_files(ok.dest(), files, calling_ae="TRIAGE", timeout_s=5)] == [
        DELIVERED, DELIVERED]
    assert len(list(ok.out.iterdir())) == 2

    refused = scp("--refuse")
    outs = send_files(refused.dest(), files, calling_ae="TRIAGE", timeout_s=5)
    # storescp sends A-ASSOCIATE-RJ and closes at once; pynetdicom may see either first.
    assert outs[0].kind in (PERMANENT, TRANSIENT)
    assert "rejected" in (outs[0].error or "") or "refused" in (outs[0].error or "")

    aborting = scp("--abort-during")
    outs = send_files(aborting.dest(), files, calling_ae="TRIAGE", timeout_s=5)
    assert outs[0].kind == TRANSIENT

    sleeping = scp("--sleep-during", "6")
    outs = send_files(sleeping.dest(), files[:1], calling_ae="TRIAGE", timeout_s=2)
    assert outs[0].kind == TRANSIENT

    nobody = DestinationConfig(ae_title="PACS", host="127.0.0.1", port=free_port())
    outs = send_files(nobody, files[:1], calling_ae="TRIAGE", timeout_s=2)
    assert outs[0].kind == TRANSIENT and outs[0].status is None


def _one_delivery(sessions: Any, storage: Storage, src: Path, dest: str) -> int:
    rel = "outputs/x.dcm"
    storage.write_atomic(rel, [src.read_bytes()])
    with sessions() as s, s.begin():
        st = Study(study_instance_uid="1.2.3")
        s.add(st)
        s.flush()
        se = Series(series_instance_uid="1.2.3.4", study_id=st.id, generation=1,
                    state=SeriesState.SCORED)
        s.add(se)
        s.flush()
        job = Job(series_id=se.id, generation=1, state="done")
        s.add(job)
        s.flush()
        res = Result(job_id=job.id, series_id=se.id, score=1.0, verdict="abnormal",
                     threshold=0.5, model_name="m", model_version="1", weights_sha256="x")
        s.add(res)
        s.flush()
        out = Output(result_id=res.id, kind="sr", sop_class_uid="1.2", sop_instance_uid="1.2.9",
                     series_instance_uid="1.2.8", path=rel)
        s.add(out)
        s.flush()
        d = Delivery(output_id=out.id, destination=dest)
        s.add(d)
        s.flush()
        return d.id


def test_retry_backoff_dead_letter_and_recovery(db_url: str, scp: Any, tmp_path: Path) -> None:
    db.upgrade(db_url)
    engine = db.make_engine(db_url)
    sessions = db.session_factory(engine)
    storage = Storage(tmp_path / "storage")
    src = make_series(tmp_path / "ct", n=1, seed=2, size=32)[0]
    port = free_port()
    dest = DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    cfg = AgentConfig(destinations=[dest]).model_copy(update={
        "delivery": AgentConfig().delivery.model_copy(update={
            "max_attempts": 3, "backoff_base_s": 0.01, "backoff_cap_s": 0.02, "timeout_s": 2})})
    did = _one_delivery(sessions, storage, src, "pacs")
    sender = Sender(cfg, sessions, storage)

    # PACS down: each run is a failed attempt with a growing, capped delay; then a dead letter.
    import time

    for attempt in (1, 2):
        assert sender.run_once() == 1
        with sessions() as s:
            d = s.get(Delivery, did)
            assert d.state == "pending" and d.attempts == attempt
            assert "cannot connect" in d.last_error or "refused" in d.last_error
            assert d.next_attempt_at > utcnow() - dt.timedelta(seconds=1)
        time.sleep(0.05)
    assert sender.run_once() == 1
    with sessions() as s:
        d = s.get(Delivery, did)
        assert d.state == "dead" and "gave up after 3 attempts" in d.last_error
        assert s.scalar(select(Series.state)) == SeriesState.FAILED
    assert sender.run_once() == 0  # dead letters are not retried by themselves

    # The PACS comes back on that port; an admin runs `triage-agent retry`.
    back = StoreSCP(tmp_path / "pacs-back", port=port)
    try:
        assert retry_dead(sessions) == 1
        assert sender.run_once() == 1
        with sessions() as s:
            d = s.get(Delivery, did)
            assert d.state == "delivered" and d.last_status == 0
            assert s.scalar(select(Series.state)) == SeriesState.DELIVERED
    finally:
        back.stop()
    engine.dispose()


def test_delivery_associations_keep_each_response_for_its_store(
        scp: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's requestor can drop a fast PACS's response (tests/test_pynetdicom_compat.py);
    every delivery association is guarded against that."""
    from triage_agent import pynetdicom_compat

    guarded: list[Any] = []
    real = pynetdicom_compat.keep_responses_for_the_caller
    monkeypatch.setattr(pynetdicom_compat, "keep_responses_for_the_caller",
                        lambda a: guarded.append(a) or real(a))
    files = make_series(tmp_path / "ct", n=2, seed=3, size=32)
    outs = send_files(scp().dest(), files, calling_ae="TRIAGE", timeout_s=5)
    assert [o.kind for o in outs] == [DELIVERED, DELIVERED]
    assert len(guarded) == 1 and guarded[0]._serve_request.__name__ == "serve_request"


def test_delivery_associations_send_without_nagle(scp: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each object's PDUs leave at once instead of waiting for the PACS's delayed ACK."""
    from triage_agent import pynetdicom_compat

    seen: list[bool] = []
    real = pynetdicom_compat.set_nodelay
    monkeypatch.setattr(pynetdicom_compat, "set_nodelay", lambda a: seen.append(real(a)) or True)
    files = make_series(tmp_path / "ct", n=2, seed=2, size=32)
    outs = send_files(scp().dest(), files, calling_ae="TRIAGE", timeout_s=5)
    assert [o.kind for o in outs] == [DELIVERED, DELIVERED]
    assert seen == [True]
