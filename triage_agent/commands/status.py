"""``triage-agent status``: where each recent series is, and why."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from triage_agent.commands._common import add_config_argument, config_or_exit

if TYPE_CHECKING:
    from triage_agent.status_view import SeriesStatus


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status", help="recent series: state, priority, score, verdict, deliveries and reasons",
        description="The most recently received series, newest first: instance count, state, "
                    "worklist priority, verdict and score, deliveries, and why a series was "
                    "skipped or failed. Never shows patient identifiers.")
    add_config_argument(p)
    p.add_argument("--json", action="store_true",
                   help="one JSON object per series instead of the table")
    p.add_argument("--limit", type=_positive, default=50, metavar="N",
                   help="how many recent series (default 50)")
    p.set_defaults(func=run)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return n


def run(args: argparse.Namespace) -> int:
    from triage_agent import db
    from triage_agent.status_view import recent_series

    cfg = config_or_exit(args.config)
    engine = db.make_engine(cfg.database.url)
    try:
        db.check_connection(engine)
        rows = recent_series(db.session_factory(engine), args.limit)
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
            print(json.dumps(rec.to_json()))
    elif rows:
        print("\n".join(table(rows)))
    else:
        print("no series received yet")
    return 0


def table(rows: list[SeriesStatus]) -> list[str]:
    """The text table: one line per series, the detail column last."""
    pw = max([len("priority"), *(len(r.priority or "") for r in rows)])
    hdr = (f"{'last received (UTC)':20} {'series':14} {'description':24} {'n':>4} {'state':11} "
           f"{'priority':{pw}} detail")
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        lines.append(
            f"{r.last_received_at.isoformat(timespec='seconds'):20} "
            f"...{r.series_instance_uid[-11:]:11} {(r.series_description or '')[:24]:24} "
            f"{r.instances:>4} {r.state:11} {r.priority or '-':{pw}} {detail(r)}".rstrip()
        )
    return lines


def detail(r: SeriesStatus) -> str:
    if not r.has_result:
        return r.reason or ""
    sc = "-" if r.score is None else f"{r.score:.3f}"
    text = f"{r.verdict} score {sc} (threshold {r.threshold:.3f})"
    if r.reason:
        text += f"; {r.reason}"
    if r.deliveries:
        text += f"; deliveries {r.delivery_summary()}"
        dead = r.first_dead()
        if dead is not None:
            text += f" (dead #{dead.id} to {dead.destination}: {dead.error})"
    return text
