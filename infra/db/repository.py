"""Data functions: keyword-only, one transaction's worth of work each, idempotent where a
re-run can repeat them (unique constraints decide, not in-process locks)."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from infra.db.models import (
    ERROR_FINISH,
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
    page_count: int | None = None


def claim_document(
    *, session: Session, identity: DocumentIdentity, pipeline_version: str, lease_seconds: float
) -> Claim:
    """Finds or creates the document for this content and pipeline version.

    A done document is reported as such (the caller skips it); anything else is (re)started
    and held under a lease of `lease_seconds` that the run renews. Content without a hash
    (rejected before download) is keyed on its source and size instead.
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
        return Claim(document.id, already_done=True, page_count=document.page_count)
    start_run(session=session, document=document, lease_seconds=lease_seconds)
    return Claim(document.id, already_done=False)


def start_run(*, session: Session, document: Document, lease_seconds: float) -> None:
    """Marks a document running under a fresh lease."""
    now = utcnow()
    document.status = DocumentStatus.RUNNING
    document.error = None
    document.started_at = now
    document.lease_expires_at = now + timedelta(seconds=lease_seconds)
    session.flush()


def renew_lease(*, session: Session, document_id: int, lease_seconds: float) -> bool:
    """Extends a running document's lease; False when it is not running any more."""
    result = session.execute(
        update(Document)
        .where(Document.id == document_id, Document.status == DocumentStatus.RUNNING)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


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


def record_document_failure(
    *, session: Session, document_id: int, error: str, status: str = DocumentStatus.FAILED
) -> None:
    """Ends a run that could not work the document's pages: `failed` for a bad file,
    `incomplete` for a fault that a later run may not meet."""
    document = session.get_one(Document, document_id)
    document.status = status
    document.error = error
    document.finished_at = utcnow()
    document.lease_expires_at = None


def set_page_count(*, session: Session, document_id: int, page_count: int, media_type: str) -> None:
    document = session.get_one(Document, document_id)
    document.page_count = page_count
    document.media_type = media_type


def reopen_pages(*, session: Session, document_id: int, statuses: Collection[str]) -> int:
    """Puts a document's pages in `statuses` back to pending with a fresh failure budget
    (`redrive`); returns how many."""
    if not statuses:
        return 0
    result = session.execute(
        update(Page)
        .where(Page.document_id == document_id, Page.status.in_(statuses))
        .values(status=PageStatus.PENDING, failures=0, next_attempt_at=None)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


def pages_to_run(*, session: Session, document_id: int, page_count: int) -> list[int]:
    """Page numbers a run works: those never recorded, pending, or retrying."""
    settled = session.scalars(
        select(Page.page_no).where(
            Page.document_id == document_id, Page.status.not_in(PageStatus.UNFINISHED)
        )
    )
    skip = set(settled)
    return [n for n in range(1, page_count + 1) if n not in skip]


@dataclass(frozen=True)
class RetryPolicy:
    """How often a page that failed for a transient reason is tried again, and when."""

    max_failures: int
    base_seconds: float
    max_seconds: float

    def delay(self, failures: int) -> timedelta:
        """Exponential backoff: base, 2x base, 4x base, ... capped."""
        seconds = self.base_seconds * 2 ** max(0, failures - 1)
        return timedelta(seconds=min(seconds, self.max_seconds))


@dataclass
class AttemptRecord:
    result_fields: dict[str, Any]  # PageResult columns
    token_fields: dict[str, Any] | None  # TokenStat columns, None for engines without tokens
    attempt_key: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class PageRecord:
    page_no: int
    width: float
    height: float
    fields: dict[str, Any]  # Page columns: route, mode, status, features, estimates, error
    attempts: list[AttemptRecord]
    infrastructure_error: bool = False  # retrying because a service was away, not the page


def record_page(
    *, session: Session, document_id: int, page: PageRecord, retry: RetryPolicy
) -> Page:
    """`record_pages` for one page."""
    return record_pages(session=session, document_id=document_id, pages=[page], retry=retry)[0]


def record_pages(
    *, session: Session, document_id: int, pages: Sequence[PageRecord], retry: RetryPolicy
) -> list[Page]:
    """Writes pages of one document (distinct page numbers), their new attempts and those
    attempts' token stats in the caller's transaction; returns their rows in the order given.

    Idempotent: attempts already written (by key) are skipped, so a retried write adds
    nothing. A retrying page counts its failed attempts; past `retry.max_failures` it ends
    failed with the last reason, else it waits out the backoff.

    The pages share each statement (a handful for the lot, not per page): the ingest process
    stores every page of a run, and one page at a time its ORM flushes and round trips were a
    fifth of that process's time (py-spy, `bench.e2e_gpu --engine instant`).
    """
    if not pages:
        return []
    numbers = [page.page_no for page in pages]
    if len(set(numbers)) < len(numbers):  # one page's attempts would hide the other's
        raise ValueError(f"pages written together must differ: {sorted(numbers)}")
    rows = {
        row.page_no: row
        for row in session.scalars(
            select(Page).where(Page.document_id == document_id, Page.page_no.in_(numbers))
        )
    }
    for page in pages:
        row = rows.get(page.page_no)
        if row is None:
            row = rows[page.page_no] = Page(
                document_id=document_id, page_no=page.page_no, width=page.width, height=page.height
            )
            session.add(row)
        for name, value in page.fields.items():
            setattr(row, name, value)
    session.flush()
    written: dict[int, set[str]] = {rows[number].id: set() for number in numbers}
    last: dict[int, int] = dict.fromkeys(written, 0)
    stored = session.execute(
        select(PageResult.page_id, PageResult.attempt_key, PageResult.attempt).where(
            PageResult.page_id.in_(written)
        )
    )
    for page_id, attempt_key, attempt in stored:
        written[page_id].add(attempt_key)
        last[page_id] = max(last[page_id], attempt)
    new_attempts = {
        page.page_no: [
            a for a in page.attempts if a.attempt_key not in written[rows[page.page_no].id]
        ]
        for page in pages
    }
    superseded = [
        rows[number].id
        for number, attempts in new_attempts.items()
        if any(a.result_fields["accepted"] for a in attempts)
    ]
    if superseded:
        _supersede_accepted(session, superseded)
    for number, attempts in new_attempts.items():
        row = rows[number]
        _add_attempts(session, row, attempts, first=last[row.id] + 1)
        row.attempts = last[row.id] + len(attempts)
        row.next_attempt_at = None
        if row.status == PageStatus.RETRYING:
            if row.failures >= retry.max_failures:
                row.status = PageStatus.FAILED
                row.error = f"{row.error} (gave up after {row.failures} failed attempts)"
            else:
                row.next_attempt_at = utcnow() + retry.delay(row.failures)
    session.flush()
    return [rows[number] for number in numbers]


def _add_attempts(session: Session, row: Page, attempts: list[AttemptRecord], first: int) -> None:
    for number, attempt in enumerate(attempts, start=first):
        result = PageResult(
            page_id=row.id, attempt=number, attempt_key=attempt.attempt_key, **attempt.result_fields
        )
        session.add(result)
        if attempt.token_fields is not None:
            result.token_stat = TokenStat(**attempt.token_fields)
        if attempt.result_fields["finish_reason"] == ERROR_FINISH:
            row.failures += 1


def _supersede_accepted(session: Session, page_ids: list[int]) -> None:
    """An earlier accepted attempt stops being its page's answer (a redriven page)."""
    session.execute(
        update(PageResult)
        .where(PageResult.page_id.in_(page_ids), PageResult.accepted)
        .values(accepted=False, rejection_reason="superseded by a later attempt")
        .execution_options(synchronize_session=False)
    )


def finish_document(*, session: Session, document_id: int) -> str:
    """Settles a run's document: done when every page succeeded, incomplete while pages are
    unfinished (never recorded, pending or retrying), else failed. Returns the status."""
    document = session.get_one(Document, document_id)
    counts = dict(
        session.execute(
            select(Page.status, func.count())
            .where(Page.document_id == document_id)
            .group_by(Page.status)
        ).all()
    )
    page_count = document.page_count or 0
    succeeded = sum(counts.get(status, 0) for status in PageStatus.SUCCESS)
    failed = counts.get(PageStatus.FAILED, 0)
    unfinished = page_count - succeeded - failed
    if unfinished > 0:
        document.status = DocumentStatus.INCOMPLETE
        document.error = f"{unfinished} of {page_count} pages unfinished" + _first_error(
            session, document_id, PageStatus.UNFINISHED
        )
    elif failed:
        document.status = DocumentStatus.FAILED
        document.error = f"{failed} of {page_count} pages failed" + _first_error(
            session, document_id, {PageStatus.FAILED}
        )
    else:
        document.status = DocumentStatus.DONE
        document.error = None
    document.finished_at = utcnow()
    document.lease_expires_at = None
    return document.status


def _first_error(session: Session, document_id: int, statuses: Collection[str]) -> str:
    row = session.execute(
        select(Page.page_no, Page.error)
        .where(Page.document_id == document_id, Page.status.in_(statuses), Page.error.is_not(None))
        .order_by(Page.page_no)
        .limit(1)
    ).first()
    return f"; page {row.page_no}: {row.error}" if row else ""


@dataclass(frozen=True)
class RedriveTarget:
    """A document a redrive works: where its bytes are and which content they must be."""

    document_id: int
    source_uri: str
    sha256: str | None
    etag: str | None
    version_id: str | None


def redrive_targets(
    *, session: Session, document_ids: Collection[int] | None, statuses: Collection[str]
) -> tuple[list[RedriveTarget], list[int]]:
    """The documents a redrive works, and the asked-for ids that do not exist.

    Named documents are worked whatever their state. Without names: every document with a page
    in `statuses`, every `incomplete` one, and every `running` one whose lease ran out (its
    run died).
    """
    query = select(Document)
    if document_ids is not None:
        query = query.where(Document.id.in_(document_ids))
    else:
        with_pages = select(Page.document_id).where(Page.status.in_(statuses))
        query = query.where(
            or_(
                Document.id.in_(with_pages),
                Document.status == DocumentStatus.INCOMPLETE,
                and_(
                    Document.status == DocumentStatus.RUNNING,
                    or_(Document.lease_expires_at.is_(None), Document.lease_expires_at < utcnow()),
                ),
            )
        )
    documents = session.scalars(query.order_by(Document.id)).all()
    found = {document.id for document in documents}
    missing = sorted(set(document_ids or ()) - found)
    targets = [RedriveTarget(d.id, d.source_uri, d.sha256, d.etag, d.version_id) for d in documents]
    return targets, missing
