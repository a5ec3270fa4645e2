"""The ``triage-agent`` command line.

Each subcommand lives in ``triage_agent/commands/<name>.py`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func(args) -> int``. Logging is configured here and nowhere else.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from triage_agent import commands

COMMAND_ORDER = [
    "serve", "worker", "status", "check_config", "db", "score", "synth", "train", "evaluate",
]


def _command_modules() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")}
    ordered = [n for n in COMMAND_ORDER if n in found]
    return ordered + sorted(found - set(ordered))


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """All subcommands, or only ``only`` (saves importing torch for `status`, `serve`, ...)."""
    parser = argparse.ArgumentParser(
        prog="triage-agent",
        description="DICOM node that triages non-contrast head CT studies.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = _command_modules()
    if only is not None and only in names:
        names = [only]
    for name in names:
        importlib.import_module(f"triage_agent.commands.{name}").register(sub)
    return parser


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default="agent.toml", metavar="PATH",
        help="agent configuration file (default: ./agent.toml)",
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log collectors (same fields as the text format)."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        obj = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj)


class RateLimitFilter(logging.Filter):
    """At most ``burst`` records per message template per minute: a peer sending noise makes
    pynetdicom log one error per 6 bytes, which must not fill the disk."""

    def __init__(self, burst: int = 20, window_s: float = 60.0) -> None:
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self.counts: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        import time

        key = f"{record.name}:{str(record.msg)[:48]}"
        now = time.monotonic()
        start, n = self.counts.get(key, (now, 0))
        if now - start > self.window_s:
            start, n = now, 0
        self.counts[key] = (start, n + 1)
        if n == self.burst:
            record.msg = f"{record.msg} (further messages like this suppressed for a minute)"
        return n <= self.burst


def configure_logging(level: str = "INFO", verbose: bool = False, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    logging.basicConfig(
        level=logging.DEBUG if verbose else getattr(logging, level, logging.INFO),
        handlers=[handler],
        force=True,
    )
    # pynetdicom logs request identifiers (patient names/IDs) at INFO/DEBUG; keep it at WARNING.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    handler.addFilter(RateLimitFilter())
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first.replace("-", "_") if first else None)
    args = parser.parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
