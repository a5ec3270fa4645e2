"""Logging set-up for every command: text or JSON lines on stderr, a rate limit per message,
and pynetdicom, Alembic and APScheduler kept at WARNING (pynetdicom logs patient identifiers at
INFO/DEBUG)."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log collectors (same fields as the text format)."""

    def format(self, record: logging.LogRecord) -> str:
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
