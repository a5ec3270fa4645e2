"""The status page lists series as the reading room needs them: the most urgent priority band
first, then routine, then series not scored yet; newest first within each."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

from triage_agent.config import AgentConfig
from triage_agent.status_view import SeriesStatus
from triage_agent.web import by_priority


def row(n: int, minute: int, priority: str | None) -> SeriesStatus:
    return SeriesStatus(
        series_id=n, study_instance_uid=f"1.2.{n}", series_instance_uid=f"1.2.{n}.1",
        series_description=None, modality="CT", state="delivered" if priority else "queued",
        reason=None, instances=30, jobs=1,
        last_received_at=dt.datetime(2026, 12, 3, 8, minute), completed_at=None,
        has_result=priority is not None, priority=priority,
        verdict=None if priority is None else ("normal" if priority == "routine" else "abnormal"),
    )


def test_most_urgent_first_then_newest() -> None:
    app = SimpleNamespace(cfg=AgentConfig(), model=None)  # default bands: urgent, high
    rows = [row(1, 0, "routine"), row(2, 1, "high"), row(3, 2, None), row(4, 3, "urgent"),
            row(5, 4, "routine"), row(6, 5, "high"), row(7, 6, "urgent")]
    assert [r.series_id for r in by_priority(rows, app)] == [7, 4, 6, 2, 5, 1, 3]
