"""Data functions: keyword-only, one transaction's worth of work each, idempotent where a
re-run can repeat them (unique constraints decide, not in-process locks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from infra.db.models import (
    Document,
    DocumentStatus,
    Page,
    PageResult,
    PageStatus,
    TokenStat,
    utcnow,
)


@dataclass(frozen=True)
class DocumentIdentity:
    source_uri: str
    sha256: str | None
    size_bytes: int | None
    media_type: str | None = None
    bucket: str | None = None
    key: str | None = None
    version_id: str | None = None
    etag: str | None = None


@dataclass(frozen=True)
class Claim:
    document_id: int
    already_done: bool


def claim_document(*, session: Session, identity: DocumentIdentity, pipeline_version: str) -> Claim:
    """Finds or creates the document for this content and pipeline version.

    A done document is reported as such (the caller skips it); anything else is (re)started.
    Content without a hash (rejected before download) is keyed on its source and size instead.
    """
    document = _find_document(session=session, identity=identity, version=pipeline_version)
    if document is None:
        document = Document(
            source_uri=identity.source_uri,
            sha256=identity.sha256,
            size_bytes=identity.size_bytes,
            media_type=identity.media_type,
            bucket=identity.bucket,
            key=identity.key,
            version_id=identity.version_id,
            etag=identity.etag,
            pipeline_version=pipeline_version,
        )
        try:
            with session.begin_nested():
                session.add(document)
        except IntegrityError:  # a concurrent run registered the same content first
            document = _find_document(session=session, identity=identity, version=pipeline_version)
            assert document is not None
    if document.status == DocumentStatus.DONE:
        return Claim(document.id, already_done=True)
    document.status = DocumentStatus.RUNNING
    document.error = None
    document.started_at = utcnow()
    session.flush()
    return Claim(document.id, already_done=False)


def _find_document(
    *, session: Session, identity: DocumentIdentity, version: str
) -> Document | None:
    query = select(Document).where(Document.pipeline_version == version)
    if identity.sha256 is not None:
        query = query.where(Document.sha256 == identity.sha256)
    else:
        query = query.where(
            Document.sha256.is_(None),
            Document.source_uri == identity.source_uri,
            Document.size_bytes == identity.size_bytes,
        )
    return session.scalars(query.limit(1)).first()


def record_document_failure(*, session: Session, document_id: int, error: str) -> None:
    document = session.get_one(Document, document_id)
    document.status = DocumentStatus.FAILED
    document.error = error
    document.finished_at = utcnow()


def set_page_count(*, session: Session, document_id: int, page_count: int, media_type: str) -> None:
    document = session.get_one(Document, document_id)
    document.page_count = page_count
    document.media_type = media_type


def finished_page_numbers(*, session: Session, document_id: int) -> set[int]:
    """Pages already in a terminal state: a resumed run skips exactly these."""
    rows = session.scalars(
        select(Page.page_no).where(
            Page.document_id == document_id, Page.status.in_(PageStatus.TERMINAL)
        )
    )
    return set(rows)


@dataclass
class AttemptRecord:
    result_fields: dict[str, Any]  # PageResult columns
    token_fields: dict[str, Any] | None  # TokenStat columns, None for engines without tokens


@dataclass
class PageRecord:
    page_no: int
    width: float
    height: float
    fields: dict[str, Any]  # Page columns: route, mode, status, features, estimates, error
    attempts: list[AttemptRecord]


def record_page(*, session: Session, document_id: int, page: PageRecord) -> Page:
    """Writes a page, its attempts and their token stats in the caller's transaction."""
    row = session.scalars(
        select(Page).where(Page.document_id == document_id, Page.page_no == page.page_no)
    ).first()
    if row is None:
        row = Page(
            document_id=document_id, page_no=page.page_no, width=page.width, height=page.height
        )
        session.add(row)
    for name, value in page.fields.items():
        setattr(row, name, value)
    session.flush()
    next_attempt = (
        session.scalar(select(func.max(PageResult.attempt)).where(PageResult.page_id == row.id))
        or 0
    ) + 1
    for offset, attempt in enumerate(page.attempts):
        result = PageResult(page_id=row.id, attempt=next_attempt + offset, **attempt.result_fields)
        session.add(result)
        if attempt.token_fields is not None:
            result.token_stat = TokenStat(**attempt.token_fields)
    row.attempts = next_attempt - 1 + len(page.attempts)
    return row


def finish_document(*, session: Session, document_id: int) -> str:
    """Marks a document done when every page is terminal; returns its status."""
    document = session.get_one(Document, document_id)
    finished = len(finished_page_numbers(session=session, document_id=document_id))
    if document.page_count is not None and finished >= document.page_count:
        document.status = DocumentStatus.DONE
        document.finished_at = utcnow()
    return document.status
