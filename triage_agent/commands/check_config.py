"""``triage-agent check-config [PATH]``: validate agent.toml and print every problem."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from triage_agent.commands._common import add_config_argument

if TYPE_CHECKING:
    from triage_agent.config import AgentConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-config", help="validate agent.toml and print every error",
        description="Validate a configuration file without starting anything: every problem "
                    "is printed, exit status 2 if there is one. Also checks that the model file "
                    "exists and reports a [triage] threshold that differs from the model's.")
    p.add_argument("path", nargs="?", default=None, help="file to check (default: --config)")
    add_config_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from triage_agent.config import ConfigError, load_config

    path = args.path or args.config
    try:
        cfg = load_config(path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.model.weights is not None and not cfg.model.weights.is_file():
        print(f"error: {path}: [model] weights: file not found: {cfg.model.weights}",
              file=sys.stderr)
        return 2
    print(f"{path}: OK (AE {cfg.node.ae_title} on {cfg.node.bind_address}:{cfg.node.port}, "
          f"database {cfg.database.url.split('://')[0]}, {cfg.destinations_summary()}, "
          f"mode {cfg.triage.mode})")
    if cfg.triage.threshold is not None:
        return _check_threshold(cfg)
    return 0


def _check_threshold(cfg: AgentConfig) -> int:
    """Report a [triage] threshold that overrides a different one in the model file."""
    from triage_model.checkpoint import CheckpointError, default_weights_path, read_checkpoint

    from triage_agent.operating_point import OperatingPoint

    weights = cfg.model.weights or default_weights_path()
    try:
        ck, _ = read_checkpoint(weights)
    except CheckpointError as e:
        print(f"error: [model] weights: {e}", file=sys.stderr)
        return 2
    thresholds = ck.get("thresholds") or {}  # as Detector.threshold_for reads them
    stored = thresholds.get(cfg.triage.aggregate, thresholds.get("max", ck.get("threshold", 3.0)))
    op = OperatingPoint.resolve(cfg.triage, float(stored))
    if op.mismatch:
        print(f"warning: {op.mismatch} (model {weights.name})")
    return 0
