"""The series life cycle: quiet series become complete, then queued or skipped."""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triage_agent.config import SeriesConfig
from triage_agent.dicom_uids import IMAGE_SOP_CLASSES
from triage_agent.ingest import short_id
from triage_agent.models import Event, Job, Series, SeriesState, Study, utcnow
from triage_agent.selection import SeriesFacts, skip_reason

log = logging.getLogger(__name__)


def is_complete(last_received_at: dt.datetime, now: dt.datetime, quiet_period_s: float) -> bool:
    return (now - last_received_at).total_seconds() >= quiet_period_s


def sweep(sessions: sessionmaker[Session], rules: SeriesConfig, limit: int = 100) -> int:
    """Complete every quiet receiving series: queue a job or skip with a reason.

    Returns how many series were completed. Each series is handled in its own transaction so one
    bad row cannot hold back the others.
    """
    now = utcnow()
    cutoff = now - dt.timedelta(seconds=rules.quiet_period_s)
    with sessions() as s:
        ids = s.scalars(
            select(Series.id)
            .where(Series.state == SeriesState.RECEIVING, Series.last_received_at <= cutoff)
            .order_by(Series.last_received_at)
            .limit(limit)
        ).all()
    done = 0
    for series_id in ids:
        with sessions() as s, s.begin():
            stmt = select(Series).where(Series.id == series_id)
            if s.get_bind().dialect.name == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True)
            series = s.scalars(stmt).first()
            # Re-check under the lock: an instance may have arrived since the first query.
            if series is None or series.state != SeriesState.RECEIVING:
                continue
            if not is_complete(series.last_received_at, utcnow(), rules.quiet_period_s):
                continue
            complete_series(s, series, rules)
            done += 1
    return done


def complete_series(s: Session, series: Series, rules: SeriesConfig) -> None:
    series.generation += 1
    series.completed_at = utcnow()
    facts = SeriesFacts(
        modality=series.modality,
        body_part=series.body_part,
        series_description=series.series_description,
        instance_count=series.instance_count,
        slice_thickness_mm=series.slice_thickness_mm,
        orientation=series.orientation,
    )
    reason = skip_reason(facts, rules)
    if series.sop_class_uid not in IMAGE_SOP_CLASSES:
        # An admin-allowed non-CT SOP class: its instances are recorded, their pixels not kept.
        reason = (reason or "not a CT image") + "; SOP class recorded only, pixel data not kept"
    study_uid = s.scalar(select(Study.study_instance_uid).where(Study.id == series.study_id))
    if reason is None:
        series.state = SeriesState.QUEUED
        series.reason = None
        s.add(Job(kind="score", series_id=series.id, generation=series.generation))
        kind = "series_queued"
    else:
        series.state = SeriesState.SKIPPED
        series.reason = reason
        kind = "series_skipped"
    s.add(Event(kind=kind, series_instance_uid=series.series_instance_uid,
                study_instance_uid=study_uid,
                detail=f"{series.instance_count} instances, generation {series.generation}"
                + (f": {reason}" if reason else "")))
    log.info("series %s complete (%d instances): %s", short_id(series.series_instance_uid),
             series.instance_count, reason or "queued")
