"""Queue images stored as they are: no TOAST compression of `ocr_job.image` on Postgres.

Why: page images are already compressed (packbits TIFF) and pass through the row once; pglz
would spend CPU compressing them on insert and expanding them on every claim. SQLite has no
such setting.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE ocr_job ALTER COLUMN image SET STORAGE EXTERNAL")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE ocr_job ALTER COLUMN image SET STORAGE EXTENDED")
