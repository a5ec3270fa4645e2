"""``triage-agent status``: where each recent series is, and why."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sqlalchemy import func, select

from triage_agent import db
from triage_agent.cli import add_config_argument
from triage_agent.commands._common import config_or_exit
from triage_agent.models import Delivery, Job, Output, Result, Series, Study


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="recent studies and series with state, counts and reasons")
    add_config_argument(p)
    p.add_argument("--json", action="store_true", help="one JSON object per series")
    p.add_argument("--limit", type=int, default=50, help="how many recent series (default 50)")
    p.set_defaults(func=run)


def collect(sessions: Any, limit: int) -> list[dict[str, Any]]:
    with sessions() as s:
        latest_result = (
            select(Result.series_id, func.max(Result.id).label("rid"))
            .group_by(Result.series_id)
            .subquery()
        )
        rows = s.execute(
            select(Series, Study.study_instance_uid, Result)
            .join(Study, Study.id == Series.study_id)
            .outerjoin(latest_result, latest_result.c.series_id == Series.id)
            .outerjoin(Result, Result.id == latest_result.c.rid)
            .order_by(Series.last_received_at.desc())
            .limit(limit)
        ).all()
        job_counts = dict(
            s.execute(select(Job.series_id, func.count()).group_by(Job.series_id)).all()
        )
        result_ids = [r.id for _, _, r in rows if r is not None]
        deliveries: dict[int, list[dict[str, Any]]] = {}
        if result_ids:
            for d, kind, rid in s.execute(
                select(Delivery, Output.kind, Output.result_id)
                .join(Output, Output.id == Delivery.output_id)
                .where(Output.result_id.in_(result_ids))
                .order_by(Delivery.id)
            ).all():
                deliveries.setdefault(rid, []).append({
                    "id": d.id, "object": kind, "destination": d.destination, "state": d.state,
                    "attempts": d.attempts, "last_status": d.last_status, "error": d.last_error,
                })
    out = []
    for series, study_uid, result in rows:
        rec: dict[str, Any] = {
            "study_instance_uid": study_uid,
            "series_instance_uid": series.series_instance_uid,
            "series_description": series.series_description,
            "modality": series.modality,
            "state": series.state,
            "reason": series.reason,
            "instances": series.instance_count,
            "jobs": job_counts.get(series.id, 0),
            "last_received_at": series.last_received_at.isoformat() + "Z",
            "completed_at": series.completed_at.isoformat() + "Z" if series.completed_at else None,
        }
        if result is not None:
            rec.update(score=result.score, verdict=result.verdict, threshold=result.threshold,
                       priority=result.priority, model_version=result.model_version,
                       deliveries=deliveries.get(result.id, []))
        out.append(rec)
    return out


def run(args: argparse.Namespace) -> int:
    cfg = config_or_exit(args.config)
    engine = db.make_engine(cfg.database.url)
    try:
        db.check_connection(engine)
        rows = collect(db.session_factory(engine), args.limit)
    except db.DatabaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Exception as e:  # e.g. tables missing: the node has never run against this database
        print(f"error: cannot read status ({e.__class__.__name__}); run `triage-agent db upgrade`"
              " or start `triage-agent serve` once", file=sys.stderr)
        return 3
    finally:
        engine.dispose()
    if args.json:
        for rec in rows:
            print(json.dumps(rec))
        return 0
    if not rows:
        print("no series received yet")
        return 0
    hdr = f"{'last received (UTC)':20} {'series':14} {'description':24} {'n':>4} {'state':11} detail"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        detail = r["reason"] or ""
        if "verdict" in r:
            sc = "-" if r["score"] is None else f"{r['score']:.3f}"
            detail = f"{r['verdict']} score {sc} (threshold {r['threshold']:.3f})" + (
                f"; {r['reason']}" if r["reason"] else "")
            if r["deliveries"]:
                states: dict[str, int] = {}
                for d in r["deliveries"]:
                    states[d["state"]] = states.get(d["state"], 0) + 1
                detail += "; deliveries " + ", ".join(f"{n} {k}" for k, n in sorted(states.items()))
                dead = [d for d in r["deliveries"] if d["state"] == "dead"]
                if dead:
                    detail += f" (dead #{dead[0]['id']} to {dead[0]['destination']}: {dead[0]['error']})"
        print(f"{r['last_received_at'][:19]:20} ...{r['series_instance_uid'][-11:]:11} "
              f"{(r['series_description'] or '')[:24]:24} {r['instances']:>4} {r['state']:11} {detail}")
    return 0
