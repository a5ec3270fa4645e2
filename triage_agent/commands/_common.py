"""Helpers shared by subcommands: load config or exit with the check-config message."""

from __future__ import annotations

import sys
from pathlib import Path

from triage_agent.config import AgentConfig, ConfigError, load_config


def config_or_exit(path: str | Path) -> AgentConfig:
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
