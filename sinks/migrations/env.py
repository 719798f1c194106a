"""Alembic environment: runs on the connection :func:`sinks.schema.migrate` passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from sinks.schema import metadata

config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # `alembic` CLI use (autogenerate during development)
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "sqlite://")
        with engine.begin() as conn:
            context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
            context.run_migrations()
        return
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run()
