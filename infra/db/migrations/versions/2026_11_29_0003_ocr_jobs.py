"""GPU work queue: one row per page waiting for a GPU worker, and the workers' heartbeats.

Why: the model stays resident in one long-lived worker process per GPU, and the CPU-side flows
hand it pages through a table that every host already reaches. Workers claim jobs with
`FOR UPDATE SKIP LOCKED` under a lease; a crashed worker's leases expire and its pages are
claimed again, so no page is lost and none is answered twice. Worker heartbeats let the CPU
side fail fast when nobody serves the queue.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ocr_job",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("batch_id", sa.String(length=36), nullable=False),
        sa.Column("request_key", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=True),
        sa.Column("page_width", sa.Double(), nullable=False),
        sa.Column("page_height", sa.Double(), nullable=False),
        sa.Column("estimated_text_tokens", sa.Integer(), nullable=True),
        sa.Column("max_new_tokens", sa.Integer(), nullable=True),
        sa.Column("image", sa.LargeBinary(), nullable=True),
        sa.Column("image_format", sa.String(length=8), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_by", sa.String(length=255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "result",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ocr_job")),
        sa.UniqueConstraint(
            "batch_id", "request_key", name=op.f("uq_ocr_job_batch_id_request_key")
        ),
    )
    with op.batch_alter_table("ocr_job", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ocr_job_batch_id"), ["batch_id"], unique=False)
        batch_op.create_index("ix_ocr_job_status_id", ["status", "id"], unique=False)

    op.create_table(
        "ocr_worker",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("engine", sa.String(length=64), nullable=False),
        sa.Column("model_revision", sa.String(length=128), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pages_done", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ocr_worker")),
    )


def downgrade() -> None:
    op.drop_table("ocr_worker")
    with op.batch_alter_table("ocr_job", schema=None) as batch_op:
        batch_op.drop_index("ix_ocr_job_status_id")
        batch_op.drop_index(batch_op.f("ix_ocr_job_batch_id"))
    op.drop_table("ocr_job")
