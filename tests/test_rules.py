"""Pure rules (selection) and the queue (claim, lease, retry, dead letter) on both databases."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from triage_agent import db, queue
from triage_agent.config import SeriesConfig
from triage_agent.ingest import classify_orientation
from triage_agent.models import Job, JobState, Series, SeriesState, Study, utcnow
from triage_agent.selection import SeriesFacts, skip_reason

HEAD = SeriesFacts("CT", "HEAD", "HEAD W/O 5mm", 40, 5.0, "axial:0.0")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, None),
        ({"modality": "MR"}, "modality MR"),
        ({"body_part": "CHEST"}, "body part CHEST"),
        ({"series_description": "Topogram 0.6 T20s"}, "series description matches exclusion"),
        ({"orientation": "coronal:0.0"}, "coronal reformat"),
        ({"orientation": "axial:25.0"}, "axial tilt 25 degrees exceeds 20"),
        ({"orientation": None}, "no image orientation"),
        ({"slice_thickness_mm": 10.0}, "slice thickness 10 mm outside 0.5-6 mm"),
        ({"instance_count": 3}, "only 3 slices (minimum 20)"),
        ({"instance_count": 1}, "only 1 slice (minimum 20)"),
    ],
)
def test_selection_reasons(change: dict, reason: str | None) -> None:
    facts = SeriesFacts(**{**HEAD.__dict__, **change})
    got = skip_reason(facts, SeriesConfig())
    assert (got is None) if reason is None else got is not None and got.startswith(reason)


def test_orientation_classification() -> None:
    assert classify_orientation([1, 0, 0, 0, 1, 0]) == "axial:0.0"
    assert classify_orientation([1, 0, 0, 0, 0, -1]).startswith("coronal")
    assert classify_orientation([0, 1, 0, 0, 0, -1]).startswith("sagittal")
    import math

    t = math.radians(15)
    plane, tilt = classify_orientation([1, 0, 0, 0, math.cos(t), math.sin(t)]).split(":")
    assert plane == "axial" and abs(float(tilt) - 15) < 0.1
    assert classify_orientation(["x"] * 6) is None


def _queued_jobs(sessions, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    with sessions() as s, s.begin():
        st = Study(study_instance_uid="1.2.3")
        s.add(st)
        s.flush()
        ids = []
        for i in range(n):
            se = Series(series_instance_uid=f"1.2.3.{i}", study_id=st.id, generation=1,
                        state=SeriesState.QUEUED)
            s.add(se)
            s.flush()
            j = Job(series_id=se.id, generation=1)
            s.add(j)
            s.flush()
            ids.append(j.id)
    return ids


def test_claim_lease_expiry_retry_and_dead_letter(sessions) -> None:  # type: ignore[no-untyped-def]
    (jid,) = _queued_jobs(sessions, 1)
    with sessions() as s, s.begin():
        job = queue.claim(s, "w1", lease_s=60, max_attempts=2)
        assert job is not None and job.id == jid and job.attempts == 1
    with sessions() as s, s.begin():
        assert queue.claim(s, "w2", lease_s=60, max_attempts=2) is None  # leased to w1
        assert s.scalar(select(Series.state)) == SeriesState.PROCESSING
    # w1 crashes: its lease expires and w2 takes the job over.
    with sessions() as s, s.begin():
        s.get(Job, jid).lease_until = utcnow() - dt.timedelta(seconds=1)
    with sessions() as s, s.begin():
        job = queue.claim(s, "w2", lease_s=60, max_attempts=2)
        assert job is not None and job.worker_id == "w2" and job.attempts == 2
        assert not queue.renew(s, jid, "w1", 60)  # w1 lost it
        assert queue.renew(s, jid, "w2", 60)
        queue.fail(s, job, "boom", permanent=False, max_attempts=3)
        assert job.state == JobState.QUEUED and job.available_at > utcnow()
    with sessions() as s, s.begin():
        assert queue.claim(s, "w2", lease_s=60, max_attempts=2) is None  # backing off
        s.get(Job, jid).available_at = utcnow() - dt.timedelta(seconds=1)
    with sessions() as s, s.begin():
        job = queue.claim(s, "w3", lease_s=60, max_attempts=3)
        queue.fail(s, job, "still broken", permanent=False, max_attempts=3)
        assert job.state == JobState.FAILED
    with sessions() as s:
        series = s.scalars(select(Series)).one()
        assert series.state == SeriesState.FAILED and "still broken" in series.reason


def test_each_job_claimed_once_by_concurrent_workers(sessions) -> None:  # type: ignore[no-untyped-def]
    import threading

    ids = _queued_jobs(sessions, 20)
    claimed: list[int] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while True:
            with sessions() as s, s.begin():
                job = queue.claim(s, name, lease_s=60, max_attempts=3)
                if job is None:
                    return
                queue.complete(s, job)
                with lock:
                    claimed.append(job.id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == ids


@pytest.mark.postgres
def test_concurrent_upgrades_on_postgres_do_not_collide(pg_server) -> None:  # type: ignore[no-untyped-def]
    import threading

    url = pg_server.new_database()
    errors: list[BaseException] = []

    def up() -> None:
        try:
            db.upgrade(url)
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=up) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
