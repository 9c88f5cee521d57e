"""S3 registry: one row per content version of an S3 object, and the watched prefixes.

Why: S3 events arrive duplicated, late and out of order, events get lost, and sweeps may run
concurrently. Exactly-once processing per content version needs a shared record with a unique
(bucket, key, etag) and a claim that a database transaction decides, not a process-local lock.
Watched prefixes keep their listing cursor so an interrupted sweep resumes where it stopped.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "watched_prefix",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("bucket", sa.String(length=255), nullable=False),
        sa.Column("prefix", sa.Text(), nullable=False),
        sa.Column("cursor", sa.Text(), nullable=True),
        sa.Column("pass_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_swept_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("objects_listed", sa.Integer(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_watched_prefix")),
        sa.UniqueConstraint("bucket", "prefix", name=op.f("uq_watched_prefix_bucket_prefix")),
    )
    op.create_table(
        "source_object",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("bucket", sa.String(length=255), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("etag", sa.String(length=255), nullable=False),
        sa.Column("version_id", sa.String(length=1024), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("last_modified", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("claimed_by", sa.String(length=255), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "document_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_event_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["document_id"],
            ["document.id"],
            name=op.f("fk_source_object_document_id_document"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_source_object")),
        sa.UniqueConstraint("bucket", "key", "etag", name=op.f("uq_source_object_bucket_key_etag")),
    )
    with op.batch_alter_table("source_object", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_source_object_document_id"), ["document_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_source_object_status"), ["status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("source_object", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_source_object_status"))
        batch_op.drop_index(batch_op.f("ix_source_object_document_id"))

    op.drop_table("source_object")
    op.drop_table("watched_prefix")
