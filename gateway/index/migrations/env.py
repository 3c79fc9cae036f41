"""Alembic environment: run with the connection handed in by gateway.index.db.migrate."""

from __future__ import annotations

from alembic import context

from gateway.index.models import Base

connection = context.config.attributes.get("connection")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
