"""Alembic environment: the URL comes from triage_agent.db.alembic_config (agent.toml)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from triage_agent.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # type: ignore[attr-defined]
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # triage_agent.db.upgrade passes a connection holding a PostgreSQL advisory lock, so that
    # several processes starting at once migrate one after the other.
    given = config.attributes.get("connection")
    if given is not None:
        _run(given)
        return
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with connectable.connect() as connection:
        _run(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
