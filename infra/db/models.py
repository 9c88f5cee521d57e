"""ocrflow's own tables: documents, their pages, one result row per OCR attempt, token stats.

Postgres (JSONB, schema `ocrflow`) is the production store; SQLite is the embedded default.
The schema is mapped at connect time (`infra.db.session`), so models carry no schema name.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JsonType = JSON().with_variant(JSONB(), "postgresql")
Sha256 = Annotated[str, 64]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JsonType,
        list[Any]: JsonType,
        datetime: DateTime(timezone=True),
        Sha256: String(64),
    }


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        default=utcnow, onupdate=utcnow, server_default=func.now()
    )


class DocumentStatus:
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class PageStatus:
    PENDING = "pending"
    DONE = "done"
    NEEDS_REVIEW = "needs_review"
    FAILED = "failed"

    TERMINAL = frozenset({DONE, NEEDS_REVIEW, FAILED})


class Document(TimestampMixin, Base):
    """One content version of a source document under one pipeline version."""

    __tablename__ = "document"
    __table_args__ = (UniqueConstraint("sha256", "pipeline_version"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    source_uri: Mapped[str] = mapped_column(Text)
    bucket: Mapped[str | None] = mapped_column(String(255))
    key: Mapped[str | None] = mapped_column(Text)
    version_id: Mapped[str | None] = mapped_column(String(255))
    etag: Mapped[str | None] = mapped_column(String(255))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[Sha256 | None]
    media_type: Mapped[str | None] = mapped_column(String(127))
    status: Mapped[str] = mapped_column(String(32), default=DocumentStatus.PENDING, index=True)
    page_count: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    pipeline_version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    pages: Mapped[list[Page]] = relationship(
        back_populates="document", lazy="raise", order_by="Page.page_no"
    )

    def __repr__(self) -> str:
        return f"Document(id={self.id}, source={self.source_uri!r}, status={self.status})"


class Page(TimestampMixin, Base):
    """A page and its routing decision; its results are attempts in `page_result`."""

    __tablename__ = "page"
    __table_args__ = (UniqueConstraint("document_id", "page_no"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("document.id", ondelete="CASCADE"))
    page_no: Mapped[int]  # 1-based
    width: Mapped[float]  # points
    height: Mapped[float]
    route: Mapped[str | None] = mapped_column(String(32), index=True)
    mode: Mapped[str | None] = mapped_column(String(16))
    route_reason: Mapped[str | None] = mapped_column(Text)
    features: Mapped[dict[str, Any]] = mapped_column(default=dict)
    est_text_tokens: Mapped[int | None]
    vision_tokens: Mapped[int | None]
    expected_compression: Mapped[float | None]
    expected_precision: Mapped[float | None]
    status: Mapped[str] = mapped_column(String(32), default=PageStatus.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text)

    document: Mapped[Document] = relationship(back_populates="pages", lazy="raise")
    results: Mapped[list[PageResult]] = relationship(
        back_populates="page", lazy="raise", order_by="PageResult.attempt"
    )

    def __repr__(self) -> str:
        return f"Page(document={self.document_id}, no={self.page_no}, status={self.status})"


class PageResult(Base):
    """One attempt at a page. Rejected attempts stay, with the reason they were rejected."""

    __tablename__ = "page_result"
    __table_args__ = (UniqueConstraint("page_id", "attempt"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    page_id: Mapped[int] = mapped_column(ForeignKey("page.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int]  # 1-based
    route: Mapped[str] = mapped_column(String(32))
    mode: Mapped[str | None] = mapped_column(String(16))
    engine: Mapped[str] = mapped_column(String(64))
    model_revision: Mapped[str] = mapped_column(String(128))
    markdown: Mapped[str] = mapped_column(Text)
    blocks: Mapped[list[Any]] = mapped_column(default=list)
    raw_output: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str] = mapped_column(String(16))
    accepted: Mapped[bool]
    rejection_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())

    page: Mapped[Page] = relationship(back_populates="results", lazy="raise")
    token_stat: Mapped[TokenStat | None] = relationship(back_populates="result", lazy="raise")

    def __repr__(self) -> str:
        return f"PageResult(page={self.page_id}, attempt={self.attempt}, engine={self.engine})"


class TokenStat(Base):
    """Vision/text token accounting of one attempt: the numbers behind cost per page."""

    __tablename__ = "token_stat"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    page_result_id: Mapped[int] = mapped_column(
        ForeignKey("page_result.id", ondelete="CASCADE"), unique=True
    )
    vision_tokens: Mapped[int | None]
    valid_vision_tokens: Mapped[int | None]
    prompt_tokens: Mapped[int | None]
    output_tokens: Mapped[int | None]
    compression_ratio: Mapped[float | None]  # output text tokens / valid vision tokens
    encode_ms: Mapped[float | None]
    decode_ms: Mapped[float | None]

    result: Mapped[PageResult] = relationship(back_populates="token_stat", lazy="raise")
