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
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
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
    RUNNING = "running"  # a run holds it (`lease_expires_at`); an expired lease: the run died
    DONE = "done"  # every page done or needs_review
    INCOMPLETE = "incomplete"  # pages left pending or retrying; the next run resumes them
    FAILED = "failed"  # the file itself is bad, or pages failed for good


class PageStatus:
    PENDING = "pending"  # routed, not yet recognised
    RETRYING = "retrying"  # a transient failure; retried from `next_attempt_at`
    DONE = "done"  # accepted (OCR, text layer or blank)
    NEEDS_REVIEW = "needs_review"  # OCR rejected on every rung, no text layer to fall back on
    FAILED = "failed"  # bad input, or transient failures exhausted; `error` says why

    SUCCESS = frozenset({DONE, NEEDS_REVIEW})
    TERMINAL = frozenset({DONE, NEEDS_REVIEW, FAILED})
    UNFINISHED = frozenset({PENDING, RETRYING})


ERROR_FINISH = "error"  # `page_result.finish_reason` of an attempt that raised instead of reading


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
    lease_expires_at: Mapped[datetime | None]  # while running: renewed by the run per window

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
    attempts: Mapped[int] = mapped_column(default=0)  # page_result rows
    failures: Mapped[int] = mapped_column(default=0)  # attempts that raised (transient faults)
    next_attempt_at: Mapped[datetime | None]  # retrying: not before this
    error: Mapped[str | None] = mapped_column(Text)

    document: Mapped[Document] = relationship(back_populates="pages", lazy="raise")
    results: Mapped[list[PageResult]] = relationship(
        back_populates="page", lazy="raise", order_by="PageResult.attempt"
    )

    def __repr__(self) -> str:
        return f"Page(document={self.document_id}, no={self.page_no}, status={self.status})"


class PageResult(Base):
    """One attempt at a page. Rejected and failed attempts stay, with the reason.

    `attempt_key` names the attempt when it is made, before it is written: writing the same
    attempt again (a retried task, a resumed run) finds its key and adds nothing. At most one
    attempt per page is accepted.
    """

    __tablename__ = "page_result"
    __table_args__ = (
        UniqueConstraint("page_id", "attempt"),
        UniqueConstraint("attempt_key"),
        Index(
            "uq_page_result_accepted_page_id",
            "page_id",
            unique=True,
            postgresql_where=text("accepted"),
            sqlite_where=text("accepted"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    page_id: Mapped[int] = mapped_column(ForeignKey("page.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int]  # 1-based
    attempt_key: Mapped[str] = mapped_column(String(36))
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
    """Vision/text token accounting of one attempt: the numbers behind cost per page.

    Every attempt that read something has a row, on every route: OCR attempts carry the mode
    the router planned (also for engines without modes) and its vision tokens beside those
    spent; text-layer and blank results have their route and zero vision tokens. Output tokens
    are DeepSeek-OCR tokens, `generated` by the engine or `counted` from the stored text.
    """

    __tablename__ = "token_stat"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    page_result_id: Mapped[int] = mapped_column(
        ForeignKey("page_result.id", ondelete="CASCADE"), unique=True
    )
    route: Mapped[str] = mapped_column(String(32), default="ocr", server_default="ocr")
    planned_mode: Mapped[str | None] = mapped_column(String(16))
    planned_vision_tokens: Mapped[int | None]  # the planned mode's valid vision tokens
    vision_tokens: Mapped[int | None]  # spent
    valid_vision_tokens: Mapped[int | None]
    prompt_tokens: Mapped[int | None]
    output_tokens: Mapped[int | None]
    output_tokens_source: Mapped[str | None] = mapped_column(String(16))  # generated|counted|...
    compression_ratio: Mapped[float | None]  # output text tokens / valid vision tokens
    encode_ms: Mapped[float | None]
    decode_ms: Mapped[float | None]  # wall time inside a shared batch: overlaps batch-mates'
    gpu_ms: Mapped[float | None]  # this attempt's share of the device time: sums to GPU time

    result: Mapped[PageResult] = relationship(back_populates="token_stat", lazy="raise")


class SourceObjectStatus:
    PENDING = "pending"  # registered, waiting for a worker
    CLAIMED = "claimed"  # a worker holds the lease (claimed_by, claimed_at)
    DONE = "done"  # processed; document_id names the result
    FAILED = "failed"  # processing failed for good; error says why
    GONE = "gone"  # the version left the bucket before anyone processed it


class SourceObject(TimestampMixin, Base):
    """One content version of one S3 object: the registry that makes processing exactly-once.

    The version token is the ETag: events and listings both carry it (listings carry no version
    id), and the same bytes uploaded again are the same content version. `deleted_at` is set
    when this version stops being the object's content (deleted or overwritten); its document
    and results stay.
    """

    __tablename__ = "source_object"
    __table_args__ = (UniqueConstraint("bucket", "key", "etag"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    bucket: Mapped[str] = mapped_column(String(255))
    key: Mapped[str] = mapped_column(Text)
    etag: Mapped[str] = mapped_column(String(255))
    version_id: Mapped[str | None] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    last_modified: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(String(32), default=SourceObjectStatus.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    claimed_at: Mapped[datetime | None]
    document_id: Mapped[int | None] = mapped_column(
        ForeignKey("document.id", ondelete="SET NULL"), index=True
    )
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)  # by a listing or a HEAD
    last_event_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"SourceObject(s3://{self.bucket}/{self.key}, etag={self.etag}, {self.status})"


class WatchedPrefix(TimestampMixin, Base):
    """A prefix the sweep lists, and where an interrupted listing pass resumes."""

    __tablename__ = "watched_prefix"
    __table_args__ = (UniqueConstraint("bucket", "prefix"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    bucket: Mapped[str] = mapped_column(String(255))
    prefix: Mapped[str] = mapped_column(Text)
    cursor: Mapped[str | None] = mapped_column(Text)  # last key of the last committed page
    pass_started_at: Mapped[datetime | None]  # start of the pass the cursor belongs to
    last_swept_at: Mapped[datetime | None]  # end of the last complete pass
    objects_listed: Mapped[int] = mapped_column(default=0)  # in the last complete pass

    def __repr__(self) -> str:
        return f"WatchedPrefix(s3://{self.bucket}/{self.prefix}, cursor={self.cursor!r})"


class OcrJobStatus:
    PENDING = "pending"  # waiting for a GPU worker
    CLAIMED = "claimed"  # a worker holds the lease (claimed_by, lease_expires_at)
    DONE = "done"  # `result` holds the engine's output
    FAILED = "failed"  # failed for good; `error` says why

    TERMINAL = frozenset({DONE, FAILED})


class OcrJob(Base):
    """One page waiting for, held by, or answered by a GPU worker (the GPU work queue).

    Rows are transient: the CPU side enqueues a batch of pages under one `batch_id`, a worker
    claims jobs under a lease, and the CPU side deletes the batch once it has read the results.
    The page image travels in the row (lossless PNG), so workers need nothing but Postgres.
    """

    __tablename__ = "ocr_job"
    __table_args__ = (
        UniqueConstraint("batch_id", "request_key"),
        Index("ix_ocr_job_status_priority_id", "status", "priority", "id"),  # claim order
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    batch_id: Mapped[str] = mapped_column(String(36), index=True)  # one enqueueing call
    request_key: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=OcrJobStatus.PENDING)
    mode: Mapped[str | None] = mapped_column(String(16))
    page_width: Mapped[float]
    page_height: Mapped[float]
    estimated_text_tokens: Mapped[int | None]
    max_new_tokens: Mapped[int | None]
    # Claimed lowest first, then oldest: the pipeline passes when a page first entered the
    # queue, so its escalations go ahead of pages queued after it.
    priority: Mapped[float] = mapped_column(default=0.0, server_default="0")
    image: Mapped[bytes | None] = mapped_column(LargeBinary)  # dropped once the job is terminal
    image_format: Mapped[str] = mapped_column(String(8))
    attempts: Mapped[int] = mapped_column(default=0)  # claims so far
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    result: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    finished_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"OcrJob(id={self.id}, key={self.request_key!r}, status={self.status})"


class OcrWorker(Base):
    """A GPU worker process and its last heartbeat: whether anyone is serving the queue."""

    __tablename__ = "ocr_worker"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # host:pid:device
    host: Mapped[str] = mapped_column(String(255))
    device: Mapped[str] = mapped_column(String(64))
    engine: Mapped[str] = mapped_column(String(64))
    model_revision: Mapped[str] = mapped_column(String(128))
    capacity: Mapped[int]  # pages it decodes at once (its GPU slots)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    stopped_at: Mapped[datetime | None]
    pages_done: Mapped[int] = mapped_column(default=0)

    def __repr__(self) -> str:
        return f"OcrWorker({self.id}, last_seen={self.last_seen_at:%H:%M:%S})"
