"""Apply Alembic migrations from code, so `ocrflow db upgrade` needs no alembic.ini on disk."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("file_template", "%%(year)d_%%(month).2d_%%(day).2d_%%(rev)s_%%(slug)s")
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database to `revision` (idempotent)."""
    command.upgrade(alembic_config(database_url), revision)


def ensure_schema(database_url: str) -> None:
    """Upgrades only when behind, so every run can call it cheaply."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    if current_revision(database_url) != head:
        upgrade(database_url)


def current_revision(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from infra.db.session import get_engine

    with get_engine(database_url).connect() as connection:
        return MigrationContext.configure(
            connection, opts=_version_table_opts(database_url)
        ).get_current_revision()


def _version_table_opts(database_url: str) -> dict[str, str]:
    from infra.db.session import POSTGRES_SCHEMA, is_postgres

    return {"version_table_schema": POSTGRES_SCHEMA} if is_postgres(database_url) else {}
