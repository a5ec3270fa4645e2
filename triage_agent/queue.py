"""The job queue in the database: claim with a lease, complete, fail, retry.

Every function takes the caller's Session and runs inside the caller's transaction. On PostgreSQL
claiming uses ``FOR UPDATE SKIP LOCKED`` so many workers on many machines share one queue; on
SQLite the transaction starts with ``BEGIN IMMEDIATE`` (see db.py), which serialises claims.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
from typing import Any, cast

from sqlalchemy import CursorResult, and_, or_, select, true, update
from sqlalchemy.orm import Session

from triage_agent.models import Job, JobState, Series, SeriesState, utcnow

BACKOFF_BASE_S = 5.0
BACKOFF_CAP_S = 300.0


class QueueSignal:
    """Wakes this process's idle workers when jobs are queued (the completion sweep notifies),
    so they claim at once instead of at their next poll; polling remains for jobs queued by
    other processes and for retries whose backoff ends."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    def mark(self) -> int:
        """Take before looking at the queue; ``wait`` returns early if anything was queued since."""
        with self._cond:
            return self._generation

    def notify(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait(self, since: int, timeout_s: float) -> bool:
        """Until a notify after ``mark()`` returned ``since``, or ``timeout_s``; True if notified."""
        with self._cond:
            return self._cond.wait_for(lambda: self._generation != since, timeout_s)


#: notified when this process queued jobs (completion.sweep) or stops its workers
JOBS_QUEUED = QueueSignal()


#: Fair order among runnable jobs of equal priority: each is ranked by when it was queued plus a
#: handicap for its size (its series' slices times HANDICAP_S_PER_SLICE, at most HANDICAP_CAP_S),
#: roughly when it would be done if it ran alone. A short series queued just after a long one is
#: scored first; a long one is passed only by series queued less than its handicap after it, so
#: it waits at most HANDICAP_CAP_S longer than first-come-first-served would make it wait.
HANDICAP_S_PER_SLICE = 0.05
HANDICAP_CAP_S = 30.0
#: the oldest runnable jobs considered for that ranking at each claim
CLAIM_WINDOW = 50


def fair_key(created_at: dt.datetime, slices: int) -> dt.datetime:
    """The rank of a job in the fair order (earlier runs first)."""
    handicap = min(HANDICAP_CAP_S, HANDICAP_S_PER_SLICE * max(0, slices))
    return created_at + dt.timedelta(seconds=handicap)


def claim(session: Session, worker_id: str, lease_s: float, max_attempts: int) -> Job | None:
    """Take the next runnable job (queued, or running with an expired lease) for this worker:
    the highest priority, and within it the fair order (``fair_key``)."""
    now = utcnow()
    runnable = or_(
        and_(Job.state == JobState.QUEUED, Job.available_at <= now),
        and_(Job.state == JobState.RUNNING, Job.lease_until < now),
    )
    postgres = session.get_bind().dialect.name == "postgresql"
    passed: list[int] = []  # locked by another claimer (PostgreSQL) or no longer runnable
    while True:
        rows = session.execute(
            select(Job.id, Job.priority, Job.created_at, Series.frame_count,
                   Series.instance_count)
            .outerjoin(Series, Series.id == Job.series_id)
            .where(runnable, Job.id.not_in(passed) if passed else true())
            .order_by(Job.priority.desc(), Job.id)
            .limit(CLAIM_WINDOW)
        ).all()
        if not rows:
            return None
        top = rows[0].priority
        best = min((r for r in rows if r.priority == top), key=lambda r: (
            fair_key(r.created_at or now, r.frame_count or r.instance_count or 0), r.id))
        stmt = select(Job).where(Job.id == best.id, runnable)
        if postgres:  # the predicate is checked again on the locked row
            stmt = stmt.with_for_update(skip_locked=True)
        job = session.scalars(stmt).first()
        if job is None:
            passed.append(best.id)
            continue
        if job.state == JobState.RUNNING and job.attempts >= max_attempts:
            # Its worker died max_attempts times: a poison job. Dead-letter it, look again.
            _dead_letter(session, job, f"worker lost {job.attempts} times (lease expired)")
            continue
        job.state = JobState.RUNNING
        job.attempts += 1
        job.worker_id = worker_id
        job.started_at = now
        job.lease_until = now + dt.timedelta(seconds=lease_s)
        session.execute(
            update(Series).where(Series.id == job.series_id).values(state=SeriesState.PROCESSING)
        )
        session.flush()
        return job


def renew(session: Session, job_id: int, worker_id: str, lease_s: float) -> bool:
    """Extend the lease; False if the job is no longer ours (lease lost to another worker)."""
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.state == JobState.RUNNING)
        .values(lease_until=utcnow() + dt.timedelta(seconds=lease_s))
    )
    return bool(cast(CursorResult[Any], res).rowcount)


def complete(session: Session, job: Job,
             series_state: SeriesState = SeriesState.SCORED) -> None:
    job.state = JobState.DONE
    job.finished_at = utcnow()
    job.lease_until = None
    job.last_error = None
    _set_series_state_if_current(session, job, series_state, None)


def fail(session: Session, job: Job, error: str, *, permanent: bool, max_attempts: int) -> None:
    """Record a failure: retry later with capped exponential backoff, or dead-letter."""
    job.last_error = error[:2000]
    job.lease_until = None
    if permanent or job.attempts >= max_attempts:
        _dead_letter(session, job, error)
        return
    delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (job.attempts - 1))
    delay *= random.uniform(0.5, 1.0)  # jitter so a burst of failures does not retry in step
    job.state = JobState.QUEUED
    job.available_at = utcnow() + dt.timedelta(seconds=delay)
    _set_series_state_if_current(session, job, SeriesState.QUEUED, None)


def _dead_letter(session: Session, job: Job, error: str) -> None:
    job.state = JobState.FAILED
    job.finished_at = utcnow()
    job.lease_until = None
    job.last_error = error[:2000]
    _set_series_state_if_current(session, job, SeriesState.FAILED, f"processing failed: {error}"[:500])


def _set_series_state_if_current(session: Session, job: Job, state: SeriesState,
                                 reason: str | None) -> None:
    # A job of an older generation must not overwrite the state of a reopened series.
    session.execute(
        update(Series)
        .where(Series.id == job.series_id, Series.generation == job.generation)
        .values(state=state, reason=reason)
    )
