"""``triage-agent db upgrade``: apply the Alembic migrations to [database] url."""

from __future__ import annotations

import argparse
import sys

from triage_agent.commands._common import add_config_argument, config_or_exit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="database maintenance (schema upgrade)",
                       description="Database maintenance on [database] url.")
    dsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = dsub.add_parser("upgrade", help="create or migrate the schema to the latest version",
                         description="Apply the schema migrations shipped with the package.")
    add_config_argument(up)
    up.add_argument("--revision", default="head",
                    help="migration revision to upgrade to (default: head, the latest)")
    up.set_defaults(func=run_upgrade)


def run_upgrade(args: argparse.Namespace) -> int:
    from triage_agent.db import DatabaseError, redact_url, upgrade

    cfg = config_or_exit(args.config)
    try:
        upgrade(cfg.database.url, args.revision)
    except DatabaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(f"database {redact_url(cfg.database.url)} is at revision {args.revision}")
    return 0
