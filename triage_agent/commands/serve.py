"""``triage-agent serve``: receiver + scheduler + workers in one process."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading

from triage_agent.commands._common import add_config_argument, config_or_exit

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the DICOM node (receiver, scheduler and workers)",
        description="Receive CT series over DICOM, score them, write and deliver the reports, and "
                    "serve the HTTP status page, in one process. Prints a READY line once "
                    "listening; SIGHUP reloads the configuration, SIGTERM stops cleanly.")
    add_config_argument(p)
    p.add_argument("--port", type=int, default=None,
                   help="DICOM port to listen on, overriding [node] port (0 = any free port)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="scoring worker threads, overriding [worker] count")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, *, receiver: bool = True) -> int:
    cfg = config_or_exit(args.config)
    if args.port is not None:
        cfg = cfg.model_copy(update={"node": cfg.node.model_copy(update={"port": args.port})})
    if not receiver:  # a worker: HTTP only when asked for, on its own port
        http_port = getattr(args, "http_port", None)
        cfg = cfg.model_copy(update={"http": cfg.http.model_copy(update={
            "enabled": http_port is not None, "port": http_port or 0})})
    from triage_agent.logs import configure_logging

    configure_logging(cfg.logging.level, getattr(args, "verbose", False), cfg.logging.format)
    from triage_agent.app import App, StartupError
    from triage_agent.db import DatabaseError

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

    reload_requested = threading.Event()

    def on_hup(_signum: int, _frame: object) -> None:
        reload_requested.set()
        stop.set()  # wake the main loop; it re-arms after reloading

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    # A line tests and wrappers can wait for; ports matter when 0 (ephemeral) was asked.
    ready = "READY " + (f"{cfg.node.ae_title} port {app.receiver.port}" if app.receiver else "worker")
    if app.web is not None:
        ready += f" http {app.web.port}"
    print(ready, flush=True)
    while True:
        stop.wait()
        if not reload_requested.is_set():
            break
        reload_requested.clear()
        stop.clear()
        _reload(app, args.config)
    app.stop()
    _exit_after_clean_stop()
    return 0  # not reached


def _exit_after_clean_stop() -> None:
    """Leave the process once ``App.stop`` has returned: every file, row and audit event is
    written and every thread of ours has ended. The interpreter's own teardown (a final garbage
    collection over the loaded model, PyTorch's and ONNX Runtime's module cleanup) takes
    seconds and does nothing a stopped node needs, so a restart does not wait for it."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing to flush to
            stream.flush()
    os._exit(0)


def _reload(app: object, path: str) -> None:
    from triage_agent.config import ConfigError, load_config

    try:
        new = load_config(path)
    except ConfigError as e:
        log.error("reload refused, configuration unchanged: %s", e)
        return
    app.reload(new)  # type: ignore[attr-defined]
