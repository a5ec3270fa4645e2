"""The ``triage-agent`` command line.

Each subcommand lives in ``triage_agent/commands/<name>.py`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func(args) -> int``. Command modules import only the standard
library at module level (heavy imports go inside ``func``), so ``--help`` answers quickly.
Logging is configured here (``triage_agent.logs``) and, for ``serve``, from the config file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from triage_agent.commands._common import add_config_argument  # noqa: F401  (re-export)
from triage_agent.logs import configure_logging

COMMAND_ORDER = [
    "serve", "worker", "status", "check_config", "db", "score", "synth", "train", "evaluate",
    "calibrate", "onboard", "retry",
]
COMMANDS_PACKAGE = "triage_agent.commands"


def _command_modules() -> list[str]:
    package = importlib.import_module(COMMANDS_PACKAGE)
    found = {m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")}
    ordered = [n for n in COMMAND_ORDER if n in found]  # listed but absent: skipped
    return ordered + sorted(found - set(ordered))


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triage-agent")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """All subcommands, or only ``only`` when it names one (the others are not imported)."""
    parser = argparse.ArgumentParser(
        prog="triage-agent",
        description="DICOM node that triages non-contrast head CT studies.",
    )
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {package_version()}",
                        help="print the installed version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = _command_modules()
    if only is not None and only in names:
        names = [only]
    for name in names:
        importlib.import_module(f"{COMMANDS_PACKAGE}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first.replace("-", "_") if first else None)
    args = parser.parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return rc
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`triage-agent status | head -1`): stop quietly like other Unix
        # tools, with the SIGPIPE exit status. Point stdout at /dev/null so that the flush at
        # exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


if __name__ == "__main__":
    sys.exit(main())
