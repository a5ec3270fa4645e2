"""``triage-agent serve``: receiver + scheduler + workers in one process."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from triage_agent.cli import add_config_argument, configure_logging
from triage_agent.commands._common import config_or_exit
from triage_agent.db import DatabaseError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the DICOM node (receiver, scheduler and workers)")
    add_config_argument(p)
    p.add_argument("--port", type=int, default=None, help="override [node] port")
    p.add_argument("--workers", type=int, default=None, help="override [worker] count")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, *, receiver: bool = True) -> int:
    cfg = config_or_exit(args.config)
    if args.port is not None:
        cfg = cfg.model_copy(update={"node": cfg.node.model_copy(update={"port": args.port})})
    configure_logging(cfg.logging.level, getattr(args, "verbose", False))
    from triage_agent.app import App, StartupError

    try:
        app = App(cfg, run_receiver=receiver, worker_count=args.workers)
        app.start()
    except (DatabaseError, StartupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except OSError as e:
        print(f"error: cannot start: {e}", file=sys.stderr)
        return 3
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if receiver and app.receiver is not None:
        # A line tests and wrappers can wait for; the port matters when 0 (ephemeral) was asked.
        print(f"READY {cfg.node.ae_title} port {app.receiver.port}", flush=True)
    else:
        print("READY worker", flush=True)
    stop.wait()
    app.stop()
    return 0
