"""``triage-agent retry``: re-queue dead-lettered deliveries."""

from __future__ import annotations

import argparse

from triage_agent import db
from triage_agent.cli import add_config_argument
from triage_agent.commands._common import config_or_exit
from triage_agent.sender import retry_dead


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retry", help="re-queue dead-lettered deliveries (all, or --id N ...)")
    add_config_argument(p)
    p.add_argument("--id", type=int, nargs="*", default=None, dest="ids",
                   help="delivery ids (from `status --json`); default: every dead letter")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_or_exit(args.config)
    engine = db.make_engine(cfg.database.url)
    try:
        n = retry_dead(db.session_factory(engine), args.ids)
    finally:
        engine.dispose()
    print(f"{n} dead-lettered deliver{'y' if n == 1 else 'ies'} re-queued")
    return 0
