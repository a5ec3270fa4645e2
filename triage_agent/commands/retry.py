"""``triage-agent retry``: re-queue dead-lettered deliveries."""

from __future__ import annotations

import argparse

from triage_agent.commands._common import add_config_argument, config_or_exit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retry", help="re-queue dead-lettered deliveries (all, or --id N ...)",
        description="Give dead-lettered deliveries (see `status`) a fresh set of attempts; the "
                    "running node sends them on its next delivery pass.")
    add_config_argument(p)
    p.add_argument("--id", type=int, nargs="*", default=None, dest="ids",
                   help="delivery ids (from `status --json`); default: every dead letter")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from triage_agent import db
    from triage_agent.sender import retry_dead

    cfg = config_or_exit(args.config)
    engine = db.make_engine(cfg.database.url)
    try:
        n = retry_dead(db.session_factory(engine), args.ids)
    finally:
        engine.dispose()
    print(f"{n} dead-lettered deliver{'y' if n == 1 else 'ies'} re-queued")
    return 0
