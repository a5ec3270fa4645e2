"""Engine and sessions. The caller owns the session: one per C-STORE, one per job."""

from __future__ import annotations

import importlib.resources
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

MIGRATION_LOCK_KEY = 727_001_002  # pg_advisory_lock key that serialises migrations
# The migrations ship inside the package (pyproject maps migrations/ to triage_agent.migrations),
# so a wheel installed anywhere finds them.
MIGRATIONS_DIR = Path(str(importlib.resources.files("triage_agent.migrations")))


class DatabaseError(Exception):
    """The database cannot be reached or migrated; the message says what to check."""


# Execution option of a connection whose transaction only reads: on SQLite it begins without
# taking the write lock (``conn.execution_options(**{READ_ONLY: True})``).
READ_ONLY = "triage_read_only"

# How long a transaction may wait for a lock when no deadline is set (SQLite busy timeout).
DEFAULT_LOCK_WAIT_S = 30.0
_deadline = threading.local()


class LockTimeout(OperationalError):
    """The deadline of ``lock_wait_deadline`` passed before a transaction could begin."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no database lock within {seconds:g} s", None, Exception("deadline"))


@contextmanager
def lock_wait_deadline(seconds: float) -> Iterator[None]:
    """Transactions this thread begins inside the block wait for database locks only until
    ``seconds`` from now, all of them together (SQLite busy timeout; PostgreSQL lock_timeout
    and statement_timeout). Past the deadline they fail with an OperationalError
    (``is_lock_timeout`` says which) instead of waiting for whoever holds the lock."""
    outer = getattr(_deadline, "at", None)
    at = time.monotonic() + seconds
    _deadline.at = at if outer is None else min(outer, at)
    _deadline.seconds = seconds
    try:
        yield
    finally:
        _deadline.at = outer


def _remaining_ms() -> int | None:
    """Milliseconds left of this thread's deadline (at least 1), None without one; raises
    LockTimeout once it has passed."""
    at = getattr(_deadline, "at", None)
    if at is None:
        return None
    left = at - time.monotonic()
    if left <= 0:
        raise LockTimeout(getattr(_deadline, "seconds", 0.0))
    return max(1, int(left * 1000))


def is_lock_timeout(e: BaseException) -> bool:
    """Whether a database error means "waited too long for a lock" (retry later) rather than a
    broken database: SQLite's "database is locked"/"busy", PostgreSQL's lock_timeout (55P03)
    and statement_timeout (57014)."""
    orig = getattr(e, "orig", None)
    if isinstance(e, LockTimeout) or isinstance(orig, LockTimeout):
        return True
    if getattr(orig, "pgcode", None) in ("55P03", "57014"):
        return True
    text_ = str(orig if orig is not None else e).lower()
    return "database is locked" in text_ or "database is busy" in text_


def _busy_timeout_ms() -> int:
    """The SQLite busy timeout for a transaction begun now. Rounded down to 100 ms steps: a
    connection keeps its setting from one short transaction to the next instead of paying a
    PRAGMA for each."""
    left = _remaining_ms()
    if left is None:
        return int(DEFAULT_LOCK_WAIT_S * 1000)
    return left - left % 100 if left >= 200 else left


def _sqlite_pragmas(dbapi_conn: Any, record: Any) -> None:
    cur = dbapi_conn.cursor()
    # First, so that switching a database to WAL waits no longer than this thread may.
    ms = _busy_timeout_ms()
    cur.execute(f"PRAGMA busy_timeout={ms}")
    record.info["busy_timeout_ms"] = ms
    # WAL lets readers (status, scheduler) run beside the writer; FULL makes a commit durable
    # across power loss, which the C-STORE Success status promises (docs/reliability.md, promise 1).
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _ensure_sqlite_dir(url: str) -> None:
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)


def make_engine(url: str) -> Engine:
    u = make_url(url)
    _ensure_sqlite_dir(url)
    if u.get_backend_name() == "sqlite":
        engine = create_engine(
            url,
            connect_args={"timeout": DEFAULT_LOCK_WAIT_S, "check_same_thread": False},
            pool_size=20,
            max_overflow=20,
        )
        event.listen(engine, "connect", _sqlite_pragmas)

        # pysqlite's own transaction handling defers BEGIN; take the write lock at the start of
        # each transaction instead so that read-then-write (claims, sweeps) cannot deadlock.
        @event.listens_for(engine, "connect")
        def _no_pysqlite_begin(dbapi_conn: Any, _r: Any) -> None:
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            # The busy timeout is the lock wait: this thread's deadline if it has one.
            ms = _busy_timeout_ms()
            if conn.info.get("busy_timeout_ms") != ms:
                conn.exec_driver_sql(f"PRAGMA busy_timeout={ms}")
                conn.info["busy_timeout_ms"] = ms
            # A read-only transaction (READ_ONLY option) reads a snapshot beside the writer.
            read_only = conn.get_execution_options().get(READ_ONLY, False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    engine = create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)

    @event.listens_for(engine, "begin")
    def _pg_deadline(conn: Any) -> None:
        left = _remaining_ms()
        if left is not None:  # SET LOCAL: ends with this transaction
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {left}")
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {left}")

    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction that commits on success and rolls back on any exception."""
    with factory() as session, session.begin():
        yield session


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision``; wraps failures in DatabaseError with advice."""
    from alembic import command

    _ensure_sqlite_dir(url)
    try:
        cfg = alembic_config(url)
        if make_url(url).get_backend_name() == "postgresql":
            engine = create_engine(url, poolclass=NullPool)
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
                    conn.commit()
                    try:
                        cfg.attributes["connection"] = conn
                        command.upgrade(cfg, revision)
                        conn.commit()
                    finally:
                        conn.execute(text("SELECT pg_advisory_unlock(:k)"),
                                     {"k": MIGRATION_LOCK_KEY})
                        conn.commit()
            finally:
                engine.dispose()
            return
        command.upgrade(cfg, revision)
    except SQLAlchemyError as e:
        raise DatabaseError(
            f"cannot migrate database {redact_url(url)}: {e.__class__.__name__}: {e.orig if hasattr(e, 'orig') else e}. "
            "Check [database] url in agent.toml, that the server is running and the user may create tables."
        ) from e


def check_connection(engine: Engine) -> None:
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as e:
        raise DatabaseError(
            f"cannot connect to database {redact_url(str(engine.url))}: {e.__class__.__name__}. "
            "Check [database] url in agent.toml and that the server is running."
        ) from e


def redact_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)
