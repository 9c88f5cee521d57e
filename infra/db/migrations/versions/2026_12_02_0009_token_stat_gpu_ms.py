"""Each attempt's share of the GPU's device time (`token_stat.gpu_ms`), for the cost report.

Why: `decode_ms` is a page's wall time inside a shared batch, so summing it overstates GPU time
by about the batch size and cannot price a page. The DeepSeek engine now apportions every
batch step's time among the rows it ran; storing that share lets `stats` report GPU seconds,
pages per GPU hour and cost per million pages. Nullable: engines without a GPU (RapidOCR, the
text layer, blank pages) spend none, and attempts stored before this revision never had it.

SQLite adds the column in place (ALTER TABLE ADD COLUMN), so `token_stat` is not rebuilt and
nothing else (the search triggers live on `page_result`) needs re-creating.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("token_stat", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gpu_ms", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("token_stat", schema=None) as batch_op:
        batch_op.drop_column("gpu_ms")
