"""Engine and sessions. The caller owns the session: one per C-STORE, one per job."""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

MIGRATION_LOCK_KEY = 727_001_002  # pg_advisory_lock key that serialises migrations
# The migrations ship inside the package (pyproject maps migrations/ to triage_agent.migrations),
# so a wheel installed anywhere finds them.
MIGRATIONS_DIR = Path(str(importlib.resources.files("triage_agent.migrations")))


class DatabaseError(Exception):
    """The database cannot be reached or migrated; the message says what to check."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers (status, scheduler) run beside the writer; FULL makes a commit durable
    # across power loss, which the C-STORE Success status promises (docs/reliability.md, promise 1).
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
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
            connect_args={"timeout": 30, "check_same_thread": False},
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
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)


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
