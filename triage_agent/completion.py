"""The series life cycle: quiet series become complete, then queued or skipped.

A study is completed as a whole: with ``report = "one_per_study"`` (the default) nothing of a
study is completed while any of its series is still receiving, and then one eligible series is
queued (``selection.choose``) and the others are skipped with the reason. A series that arrives
after the study was reported is skipped ("study already reported on series ..."), unless
``late_series = "score_if_preferred"`` and the study rule ranks it above the reported one. Late
instances of the reported series itself re-run it (a new generation that supersedes its
report). With ``report = "every_eligible_series"`` each quiet series is completed on its own.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from triage_agent import queue
from triage_agent.config import SeriesConfig
from triage_agent.dicom_uids import IMAGE_SOP_CLASSES
from triage_agent.ingest import short_id
from triage_agent.models import Event, Job, Series, SeriesState, Study, utcnow
from triage_agent.selection import SeriesFacts, choose, rank_key, skip_reason

log = logging.getLogger(__name__)


def is_complete(last_received_at: dt.datetime, now: dt.datetime, quiet_period_s: float) -> bool:
    return (now - last_received_at).total_seconds() >= quiet_period_s


def sweep(sessions: sessionmaker[Session], rules: SeriesConfig, limit: int = 100) -> int:
    """Complete the quiet receiving series of up to ``limit`` studies: queue or skip each with
    a reason. Returns how many series were completed.

    Each study is handled in its own transaction, under a row lock on the study (skip_locked on
    PostgreSQL, so several sweepers share the work and never complete one study twice).
    """
    cutoff = utcnow() - dt.timedelta(seconds=rules.quiet_period_s)
    with sessions() as s:
        study_ids = s.scalars(
            select(Series.study_id)
            .where(Series.state == SeriesState.RECEIVING, Series.last_received_at <= cutoff)
            .group_by(Series.study_id)
            .order_by(func.min(Series.last_received_at))
            .limit(limit)
        ).all()
    done = 0
    for study_id in study_ids:
        with sessions() as s, s.begin():
            n = complete_study(s, study_id, rules)
        if n:  # committed: this process's idle workers claim now, not at their next poll
            queue.JOBS_QUEUED.notify()
        done += n
    return done


def facts_of(series: Series, study_uid: str | None) -> SeriesFacts:
    return SeriesFacts(
        modality=series.modality,
        body_part=series.body_part,
        series_description=series.series_description,
        instance_count=series.frame_count or series.instance_count,
        slice_thickness_mm=series.slice_thickness_mm,
        orientation=series.orientation,
        kernel=series.convolution_kernel,
        series_number=series.series_number,
        study_uid=study_uid,
        series_uid=series.series_instance_uid,
    )


def own_reason(series: Series, facts: SeriesFacts, rules: SeriesConfig) -> str | None:
    """Why the series itself is not scored (the [series] rules), or None."""
    reason = skip_reason(facts, rules)
    if series.sop_class_uid not in IMAGE_SOP_CLASSES:
        # An admin-allowed non-CT SOP class: its instances are recorded, their pixels not kept.
        reason = (reason or "not a CT image") + "; SOP class recorded only, pixel data not kept"
    return reason


def complete_study(s: Session, study_id: int, rules: SeriesConfig) -> int:
    """Complete what is quiet of one study (the caller's transaction); returns how many series."""
    postgres = s.get_bind().dialect.name == "postgresql"
    stmt = select(Study).where(Study.id == study_id)
    if postgres:
        stmt = stmt.with_for_update(skip_locked=True)
    study = s.scalars(stmt).first()
    if study is None:  # another sweeper holds it
        return 0
    q = select(Series).where(Series.study_id == study_id, Series.state == SeriesState.RECEIVING)
    if postgres:
        q = q.with_for_update()
    receiving = s.scalars(q.order_by(Series.id)).all()
    # Re-check under the lock: an instance may have arrived since the first query.
    now = utcnow()
    quiet = [x for x in receiving if is_complete(x.last_received_at, now, rules.quiet_period_s)]
    if not quiet:
        return 0
    uid = study.study_instance_uid
    facts = {x.id: facts_of(x, uid) for x in quiet}
    reasons = {x.id: own_reason(x, facts[x.id], rules) for x in quiet}
    eligible = [x for x in quiet if reasons[x.id] is None]
    if rules.report == "one_per_study" and eligible:
        if len(quiet) < len(receiving):
            return 0  # wait until the whole study is quiet
        _choose_in_study(s, study_id, uid, eligible, facts, reasons, rules)
    for x in quiet:
        _complete(s, x, uid, reasons[x.id])
    return len(quiet)


def _choose_in_study(s: Session, study_id: int, study_uid: str, eligible: list[Series],
                     facts: dict[int, SeriesFacts], reasons: dict[int, str | None],
                     rules: SeriesConfig) -> None:
    """Set the skip reason of every eligible series except the one the study rule scores."""
    ids = [x.id for x in s.scalars(select(Series).where(Series.study_id == study_id))]
    scored_before = set(s.scalars(
        select(Job.series_id).where(Job.series_id.in_(ids), Job.kind == "score")
    ).all())
    if not scored_before:
        _, losers = choose([facts[x.id] for x in eligible], rules)
        for x in eligible:
            reasons[x.id] = losers.get(x.series_instance_uid)
        return
    # The study was reported already: on the best-ranked series that has a job.
    reported = [facts_of(x, study_uid) for x in
                s.scalars(select(Series).where(Series.id.in_(scored_before)))]
    current = min(reported, key=lambda f: rank_key(f, rules))
    for x in eligible:
        if x.id in scored_before:
            continue  # late instances of a reported series: re-run, superseding its report
        if rules.late_series == "score_if_preferred" and (
                rank_key(facts[x.id], rules) < rank_key(current, rules)):
            continue
        reasons[x.id] = f"study already reported on series {short_id(current.series_uid)}"


def _complete(s: Session, series: Series, study_uid: str, reason: str | None) -> None:
    series.generation += 1
    series.completed_at = utcnow()
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
