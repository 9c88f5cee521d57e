"""The migrations build exactly the schema the models declare, on both stores: a constraint the
models rely on (one accepted attempt per page, unique attempt keys) exists in the database."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from infra.db.models import Base
from infra.db.session import POSTGRES_SCHEMA, get_engine, is_postgres


def test_migrations_match_the_models(database_url: str) -> None:
    engine = get_engine(database_url)
    with engine.connect() as connection:
        options = {"compare_type": True}
        if is_postgres(database_url):
            connection.exec_driver_sql(f"SET search_path TO {POSTGRES_SCHEMA}")
        context = MigrationContext.configure(connection, opts=options)
        differences = [
            diff
            for diff in compare_metadata(context, Base.metadata)
            if not (isinstance(diff, tuple) and diff[0] == "remove_table")  # alembic_version
        ]
    assert differences == []
