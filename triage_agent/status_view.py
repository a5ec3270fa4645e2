"""Status read model: the recent series with their state, latest result and deliveries.

``triage-agent status`` (text and ``--json``) and the HTTP status page both read this; neither
queries the tables for status on its own. Patient identifiers are left out unless the caller asks
for them (the status page behind ``[http] show_patient_identifiers``).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select

from triage_agent.models import Delivery, Event, Job, JobState, Output, Result, Series, Study


@dataclass(frozen=True)
class DeliveryStatus:
    id: int
    object: str  # "sr" | "sc"
    destination: str
    state: str
    attempts: int
    last_status: int | None
    error: str | None


@dataclass(frozen=True)
class SeriesStatus:
    """One series as the operator sees it; result fields are None until it has been scored."""

    series_id: int  # the database key (thumbnail links), not shown
    study_instance_uid: str
    series_instance_uid: str
    series_description: str | None
    modality: str | None
    state: str
    reason: str | None
    instances: int
    jobs: int
    last_received_at: dt.datetime
    completed_at: dt.datetime | None
    has_result: bool = False
    score: float | None = None
    verdict: str | None = None
    threshold: float | None = None
    priority: str | None = None
    model_version: str | None = None
    deliveries: tuple[DeliveryStatus, ...] = ()
    patient_name: str | None = None  # only filled when asked for
    patient_id: str | None = None

    def delivery_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(d.state for d in self.deliveries).items()))

    def delivery_summary(self) -> str:
        """``"1 dead, 2 delivered"``; empty when nothing was sent."""
        return ", ".join(f"{n} {state}" for state, n in self.delivery_counts().items())

    def first_dead(self) -> DeliveryStatus | None:
        return next((d for d in self.deliveries if d.state == "dead"), None)

    def to_json(self) -> dict[str, Any]:
        """The ``status --json`` record (no patient identifiers, no database keys)."""
        rec: dict[str, Any] = {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "series_description": self.series_description,
            "modality": self.modality,
            "state": self.state,
            "reason": self.reason,
            "instances": self.instances,
            "jobs": self.jobs,
            "last_received_at": _iso(self.last_received_at),
            "completed_at": _iso(self.completed_at) if self.completed_at else None,
        }
        if self.has_result:
            rec.update(score=self.score, verdict=self.verdict, threshold=self.threshold,
                       priority=self.priority, model_version=self.model_version,
                       deliveries=[asdict(d) for d in self.deliveries])
        return rec


def _iso(t: dt.datetime) -> str:
    return t.isoformat() + "Z"  # stored naive UTC


def recent_series(sessions: Any, limit: int, *, with_patient: bool = False,
                  series_id: int | None = None) -> list[SeriesStatus]:
    """The ``limit`` most recently received series (or the one ``series_id``), newest first,
    each with its latest result."""
    with sessions() as s:
        latest_result = (
            select(Result.series_id, func.max(Result.id).label("rid"))
            .group_by(Result.series_id)
            .subquery()
        )
        query = (
            select(Series, Study, Result)
            .join(Study, Study.id == Series.study_id)
            .outerjoin(latest_result, latest_result.c.series_id == Series.id)
            .outerjoin(Result, Result.id == latest_result.c.rid)
            .order_by(Series.last_received_at.desc(), Series.id.desc())
            .limit(limit)
        )
        if series_id is not None:
            query = query.where(Series.id == series_id)
        rows = s.execute(query).all()
        series_ids = [series.id for series, _, _ in rows]
        job_counts: dict[int, int] = dict(
            s.execute(  # type: ignore[arg-type]
                select(Job.series_id, func.count())
                .where(Job.series_id.in_(series_ids))
                .group_by(Job.series_id)
            ).all()
        ) if series_ids else {}
        result_ids = [r.id for _, _, r in rows if r is not None]
        deliveries: dict[int, list[DeliveryStatus]] = {}
        if result_ids:
            for d, kind, rid in s.execute(
                select(Delivery, Output.kind, Output.result_id)
                .join(Output, Output.id == Delivery.output_id)
                .where(Output.result_id.in_(result_ids))
                .order_by(Delivery.id)
            ).all():
                deliveries.setdefault(rid, []).append(DeliveryStatus(
                    id=d.id, object=kind, destination=d.destination, state=d.state,
                    attempts=d.attempts, last_status=d.last_status, error=d.last_error))
        out = []
        for series, study, result in rows:
            fields: dict[str, Any] = {}
            if result is not None:
                fields = dict(has_result=True, score=result.score, verdict=result.verdict,
                              threshold=result.threshold, priority=result.priority,
                              model_version=result.model_version,
                              deliveries=tuple(deliveries.get(result.id, ())))
            if with_patient:
                fields.update(patient_name=study.patient_name, patient_id=study.patient_id)
            out.append(SeriesStatus(
                series_id=series.id,
                study_instance_uid=study.study_instance_uid,
                series_instance_uid=series.series_instance_uid,
                series_description=series.series_description,
                modality=series.modality,
                state=series.state,
                reason=series.reason,
                instances=series.instance_count,
                jobs=job_counts.get(series.id, 0),
                last_received_at=series.last_received_at,
                completed_at=series.completed_at,
                **fields,
            ))
    return out


REFUSAL_KINDS = ("association_rejected", "contexts_refused")


@dataclass(frozen=True)
class RefusalSummary:
    """Refused associations or presentation contexts of one caller and reason (audit trail)."""

    kind: str  # one of REFUSAL_KINDS
    calling_ae: str
    detail: str
    count: int
    last_at: dt.datetime

    def describe(self) -> str:
        what = "rejected" if self.kind == "association_rejected" else "could not carry"
        return (f"{self.count} association{'s' if self.count != 1 else ''} from "
                f"{self.calling_ae or '(no AE title)'} {what}: {self.detail}")


def refusals_since(sessions: Any, since: dt.datetime, limit: int = 8) -> list[RefusalSummary]:
    """Refused associations and proposals since ``since`` (naive UTC), grouped by caller and
    reason, most recent first. Audit details name AE titles, addresses and SOP classes only."""
    with sessions() as s:
        rows = s.execute(
            select(Event.kind, Event.calling_ae, Event.detail, func.count(), func.max(Event.at))
            .where(Event.kind.in_(REFUSAL_KINDS), Event.at >= since)
            .group_by(Event.kind, Event.calling_ae, Event.detail)
            .order_by(func.max(Event.at).desc())
            .limit(limit)
        ).all()
    return [RefusalSummary(kind, ae or "", detail or "", int(n), last)
            for kind, ae, detail, n, last in rows]


def queue_depth(sessions: Any) -> int:
    """Series waiting for or in scoring."""
    with sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Job).where(
            Job.state.in_((JobState.QUEUED, JobState.RUNNING)))) or 0)
