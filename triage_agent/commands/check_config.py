"""``triage-agent check-config [PATH]``: validate agent.toml and print every problem."""

from __future__ import annotations

import argparse
import sys

from triage_agent.cli import add_config_argument
from triage_agent.config import ConfigError, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-config", help="validate agent.toml and print every error")
    p.add_argument("path", nargs="?", default=None, help="file to check (default: --config)")
    add_config_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = args.path or args.config
    try:
        cfg = load_config(path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{path}: OK (AE {cfg.node.ae_title} on {cfg.node.bind_address}:{cfg.node.port}, "
          f"database {cfg.database.url.split('://')[0]}, {len(cfg.destinations)} destination(s), "
          f"mode {cfg.triage.mode})")
    return 0
