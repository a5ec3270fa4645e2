"""The job queue in the database: claim with a lease, complete, fail, retry.

Every function takes the caller's Session and runs inside the caller's transaction. On PostgreSQL
claiming uses ``FOR UPDATE SKIP LOCKED`` so many workers on many machines share one queue; on
SQLite the transaction starts with ``BEGIN IMMEDIATE`` (see db.py), which serialises claims.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Any, cast

from sqlalchemy import CursorResult, and_, or_, select, update
from sqlalchemy.orm import Session

from triage_agent.models import Job, JobState, Series, SeriesState, utcnow

BACKOFF_BASE_S = 5.0
BACKOFF_CAP_S = 300.0


def claim(session: Session, worker_id: str, lease_s: float, max_attempts: int) -> Job | None:
    """Take the next runnable job (queued, or running with an expired lease) for this worker."""
    now = utcnow()
    while True:
        stmt = (
            select(Job)
            .where(
                or_(
                    and_(Job.state == JobState.QUEUED, Job.available_at <= now),
                    and_(Job.state == JobState.RUNNING, Job.lease_until < now),
                )
            )
            .order_by(Job.priority.desc(), Job.id)
            .limit(1)
        )
        if session.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        job = session.scalars(stmt).first()
        if job is None:
            return None
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
