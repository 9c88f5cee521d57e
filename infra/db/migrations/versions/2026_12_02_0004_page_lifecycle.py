"""Page lifecycle: retryable pages, document leases, idempotent attempts.

Why: a transient fault (no GPU worker, a database blip) must leave a page retryable with its
failure count and next-attempt time instead of failed; a run's hold on a document must expire
when the run dies, so watch and redrive can resume it; and writing the same attempt twice (a
retried persist after a dropped connection) must not add a second row. `attempt_key` names
an attempt when it is made; the unique constraint on it and the partial unique index (one
accepted attempt per page) hold that in the schema, not only in code. Existing rows get keys
from their ids, and a page that had several accepted attempts keeps only its latest.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("document", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True)))
    with op.batch_alter_table("page", schema=None) as batch_op:
        batch_op.add_column(sa.Column("failures", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True)))
    with op.batch_alter_table("page_result", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempt_key", sa.String(length=36)))
    op.execute("UPDATE page_result SET attempt_key = 'legacy-' || CAST(id AS VARCHAR(20))")
    op.execute(
        "UPDATE page_result SET accepted = false WHERE accepted AND id NOT IN "
        "(SELECT max(id) FROM page_result WHERE accepted GROUP BY page_id)"
    )
    with op.batch_alter_table("page_result", schema=None) as batch_op:
        batch_op.alter_column("attempt_key", existing_type=sa.String(length=36), nullable=False)
        batch_op.create_unique_constraint(batch_op.f("uq_page_result_attempt_key"), ["attempt_key"])
        batch_op.create_index(
            "uq_page_result_accepted_page_id",
            ["page_id"],
            unique=True,
            postgresql_where=sa.text("accepted"),
            sqlite_where=sa.text("accepted"),
        )


def downgrade() -> None:
    with op.batch_alter_table("page_result", schema=None) as batch_op:
        batch_op.drop_index("uq_page_result_accepted_page_id")
        batch_op.drop_constraint(batch_op.f("uq_page_result_attempt_key"), type_="unique")
        batch_op.drop_column("attempt_key")
    with op.batch_alter_table("page", schema=None) as batch_op:
        batch_op.drop_column("next_attempt_at")
        batch_op.drop_column("failures")
    with op.batch_alter_table("document", schema=None) as batch_op:
        batch_op.drop_column("lease_expires_at")
