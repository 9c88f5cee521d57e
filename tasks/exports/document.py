"""What an export reads: a document and each page's accepted result, loaded in one query.

Only the accepted attempt is exported: a rejected or failed attempt is history, not the page's
text. A page without an accepted attempt (needs_review, failed) is exported with no text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from infra.db.models import Document, Page
from infra.vocabulary import Route


@dataclass(frozen=True)
class ExportPage:
    page_no: int
    width: float  # points (pixels for image sources), the coordinates of `blocks`' boxes
    height: float
    status: str
    route: str | None  # of the accepted result
    mode: str | None
    engine: str | None
    markdown: str  # "" when nothing was accepted
    blocks: list[dict[str, Any]] = field(default_factory=list)
    raw_output: str = ""
    error: str | None = None

    @property
    def recognised(self) -> bool:
        """Whether this page's text came from OCR (and so needs a text layer in a PDF)."""
        return self.route == Route.OCR and bool(self.markdown or self.blocks)


@dataclass(frozen=True)
class ExportDocument:
    id: int
    source_uri: str
    sha256: str | None
    media_type: str | None
    status: str
    page_count: int | None
    bucket: str | None
    key: str | None
    version_id: str | None
    etag: str | None
    pages: list[ExportPage]

    @property
    def is_s3(self) -> bool:
        return self.source_uri.startswith("s3://")


class DocumentNotFound(LookupError):
    pass


def load_export_document(*, session: Session, document_id: int) -> ExportDocument:
    """The document and its pages in page order, each with its accepted result."""
    document = session.scalars(
        select(Document)
        .where(Document.id == document_id)
        .options(selectinload(Document.pages).selectinload(Page.results))
    ).first()
    if document is None:
        raise DocumentNotFound(f"no document with id {document_id}")
    return ExportDocument(
        id=document.id,
        source_uri=document.source_uri,
        sha256=document.sha256,
        media_type=document.media_type,
        status=document.status,
        page_count=document.page_count,
        bucket=document.bucket,
        key=document.key,
        version_id=document.version_id,
        etag=document.etag,
        pages=[_export_page(page) for page in document.pages],
    )


def _export_page(page: Page) -> ExportPage:
    accepted = next((result for result in page.results if result.accepted), None)
    return ExportPage(
        page_no=page.page_no,
        width=page.width,
        height=page.height,
        status=page.status,
        route=accepted.route if accepted else None,
        mode=accepted.mode if accepted else None,
        engine=accepted.engine if accepted else None,
        markdown=accepted.markdown if accepted else "",
        blocks=list(accepted.blocks) if accepted else [],
        raw_output=accepted.raw_output if accepted else "",
        error=page.error,
    )
