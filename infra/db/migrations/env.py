"""Alembic environment: the URL comes from the caller (settings), never from a config file."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from infra.db.models import Base
from infra.db.session import POSTGRES_SCHEMA, get_engine, is_postgres
from infra.settings import get_settings

url = context.config.attributes.get("database_url") or get_settings().database_url
postgres = is_postgres(url)

with get_engine(url).connect() as connection:
    if postgres:
        connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {POSTGRES_SCHEMA}"))
        connection.commit()
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        compare_type=True,
        render_as_batch=not postgres,  # SQLite alters tables by copy
        version_table_schema=POSTGRES_SCHEMA if postgres else None,
    )
    with context.begin_transaction():
        if postgres:
            # Tables made with `op` land in our schema through the engine's schema map, but
            # plain ALTER/UPDATE statements name bare tables: look them up there too.
            connection.execute(text(f"SET LOCAL search_path TO {POSTGRES_SCHEMA}"))
        context.run_migrations()
