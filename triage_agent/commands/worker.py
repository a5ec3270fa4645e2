"""``triage-agent worker``: workers only, against the shared database and storage."""

from __future__ import annotations

import argparse

from triage_agent.commands import serve
from triage_agent.commands._common import add_config_argument, config_or_exit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker", help="run queue workers only (scale-out on PostgreSQL)",
        description="Score queued series against the shared database and storage, without a "
                    "DICOM receiver: start one `serve` and as many `worker` processes as needed.")
    add_config_argument(p)
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="scoring worker threads, overriding [worker] count")
    p.add_argument("--http-port", type=int, default=None,
                   help="serve /healthz, /readyz and /metrics on this port (default: off, so "
                        "several workers can share a box)")
    p.set_defaults(func=run, port=None)


def run(args: argparse.Namespace) -> int:
    if args.workers is None:
        args.workers = max(1, config_or_exit(args.config).worker.count)
    return serve.run(args, receiver=False)
