"""Queue priority: a page's escalations keep its place in the GPU queue.

Why: the pipeline stores a window when every page of it is settled, and a page rejected at one
mode is queued again one mode up. Claimed strictly oldest-first, that retry waited behind every
page queued since, so with a deep queue no window finished until the whole backlog had been
decoded once. Jobs now carry a priority (the time the page first entered the queue) and are
claimed lowest first, then oldest.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ocr_job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority", sa.Double(), nullable=False, server_default="0"))
        batch_op.drop_index("ix_ocr_job_status_id")
        batch_op.create_index("ix_ocr_job_status_priority_id", ["status", "priority", "id"])


def downgrade() -> None:
    with op.batch_alter_table("ocr_job", schema=None) as batch_op:
        batch_op.drop_index("ix_ocr_job_status_priority_id")
        batch_op.create_index("ix_ocr_job_status_id", ["status", "id"])
        batch_op.drop_column("priority")
