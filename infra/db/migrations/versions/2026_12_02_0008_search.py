"""Full-text search over each page's accepted text, kept in step by triggers.

Why: archives need to find a word across everything ingested, in any script. The index holds
one row per accepted attempt (`page_search`, keyed by the attempt's id), and database triggers
on `page_result` add, replace and remove those rows, so every writer (ingest, redrive, GPU
workers, a hand-made fix) keeps it right without knowing it exists: an attempt that is
accepted enters, one that is superseded leaves, a deleted document takes its rows along.

Postgres: a `tsvector` in the language-neutral `simple` configuration (words as written, no
stemming: the archive is multilingual) and a pg_trgm trigram index on the same text, both GIN;
the trigrams serve substring queries (ILIKE), which is how CJK runs without spaces and Arabic
words with attached particles are found. SQLite: an FTS5 table with the `trigram` tokenizer,
which matches substrings in every script the same way.

The index lives in its own table rather than in the models' metadata: it is derived data that
only these triggers write. On Postgres that table and its trigger function sit in their own
schema, `ocrflow_search`, beside `ocrflow`, so comparing the models with the database
(autogenerate, `tests/test_schema.py`) sees only the tables the models declare. A SQLite batch
migration of `page_result` rebuilds that table and drops its triggers: such a migration must
create them again (`create_sqlite_triggers`).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from alembic import op

from infra.db.session import POSTGRES_SCHEMA

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

S = POSTGRES_SCHEMA
SEARCH = f"{POSTGRES_SCHEMA}_search"  # infra.db.search.SEARCH_SCHEMA


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _upgrade_postgres()
    else:
        op.execute(
            "CREATE VIRTUAL TABLE page_search USING fts5("
            "body, page_id UNINDEXED, tokenize = 'trigram')"
        )
        create_sqlite_triggers()
        op.execute(
            "INSERT INTO page_search (rowid, body, page_id) "
            "SELECT id, markdown, page_id FROM page_result WHERE accepted"
        )


def _upgrade_postgres() -> None:
    op.execute(f"CREATE SCHEMA IF NOT EXISTS {SEARCH}")
    op.execute(f"CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA {SEARCH}")
    trgm_schema = (
        op.get_bind()
        .exec_driver_sql(
            "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'pg_trgm'"
        )
        .scalar_one()
    )
    op.execute(f"""
        CREATE TABLE {SEARCH}.page_search (
            page_result_id BIGINT PRIMARY KEY
                REFERENCES {S}.page_result (id) ON DELETE CASCADE,
            page_id BIGINT NOT NULL REFERENCES {S}.page (id) ON DELETE CASCADE,
            body TEXT NOT NULL,
            body_tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', body)) STORED
        )""")
    op.execute(f"CREATE INDEX ix_page_search_page_id ON {SEARCH}.page_search (page_id)")
    op.execute(f"CREATE INDEX ix_page_search_body_tsv ON {SEARCH}.page_search USING gin (body_tsv)")
    op.execute(
        f"CREATE INDEX ix_page_search_body_trgm ON {SEARCH}.page_search "
        f"USING gin (body {trgm_schema}.gin_trgm_ops)"
    )
    # Names are schema-qualified: the function runs under the writer's search_path.
    op.execute(f"""
        CREATE FUNCTION {SEARCH}.page_search_sync() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'UPDATE' THEN
                DELETE FROM {SEARCH}.page_search WHERE page_result_id = OLD.id;
            END IF;
            IF NEW.accepted THEN
                INSERT INTO {SEARCH}.page_search (page_result_id, page_id, body)
                VALUES (NEW.id, NEW.page_id, NEW.markdown);
            END IF;
            RETURN NULL;
        END $$""")
    op.execute(f"""
        CREATE TRIGGER page_result_search AFTER INSERT OR UPDATE OF accepted, markdown
        ON {S}.page_result FOR EACH ROW EXECUTE FUNCTION {SEARCH}.page_search_sync()""")
    op.execute(
        f"INSERT INTO {SEARCH}.page_search (page_result_id, page_id, body) "
        f"SELECT id, page_id, markdown FROM {S}.page_result WHERE accepted"
    )


def create_sqlite_triggers() -> None:
    """Insert, update and delete of `page_result` keep `page_search` in step (deletes by
    foreign-key cascade fire the delete trigger too)."""
    op.execute("""
        CREATE TRIGGER page_result_search_insert AFTER INSERT ON page_result WHEN NEW.accepted
        BEGIN
            INSERT INTO page_search (rowid, body, page_id)
            VALUES (NEW.id, NEW.markdown, NEW.page_id);
        END""")
    op.execute("""
        CREATE TRIGGER page_result_search_update AFTER UPDATE OF accepted, markdown
        ON page_result
        BEGIN
            DELETE FROM page_search WHERE rowid = OLD.id;
            INSERT INTO page_search (rowid, body, page_id)
            SELECT NEW.id, NEW.markdown, NEW.page_id WHERE NEW.accepted;
        END""")
    op.execute("""
        CREATE TRIGGER page_result_search_delete AFTER DELETE ON page_result
        BEGIN
            DELETE FROM page_search WHERE rowid = OLD.id;
        END""")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP TRIGGER IF EXISTS page_result_search ON {S}.page_result")
        op.execute(f"DROP SCHEMA IF EXISTS {SEARCH} CASCADE")  # the table and the function
        return
    for name in ("insert", "update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS page_result_search_{name}")
    op.execute("DROP TABLE IF EXISTS page_search")
