"""Helpers shared by subcommands: the --config option, and loading it or exiting with the
check-config message. Cheap to import: ``triage-agent --help`` imports every command module."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from triage_agent.config import AgentConfig


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default="agent.toml", metavar="PATH",
        help="agent configuration file (default: ./agent.toml)",
    )


def config_or_exit(path: str | Path) -> AgentConfig:
    from triage_agent.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
