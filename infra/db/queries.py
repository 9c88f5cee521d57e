"""Read models for the CLI and result exports."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from infra.db.models import Document, Page, PageResult


def document_view(*, session: Session, document_id: int) -> dict[str, Any] | None:
    """A document with each page's final result (the accepted attempt, else the last one)."""
    document = session.scalars(
        select(Document)
        .where(Document.id == document_id)
        .options(selectinload(Document.pages).selectinload(Page.results))
    ).first()
    if document is None:
        return None
    return {
        "id": document.id,
        "source": document.source_uri,
        "status": document.status,
        "sha256": document.sha256,
        "media_type": document.media_type,
        "page_count": document.page_count,
        "error": document.error,
        "pages": [_page_view(page) for page in document.pages],
    }


PAGE_SEPARATOR = "\n\n<--- Page Split --->\n\n"  # the official PDF script's page separator


def document_markdown(view: dict[str, Any]) -> str:
    """A document view's pages as one markdown text."""
    return PAGE_SEPARATOR.join(page.get("markdown") or "" for page in view["pages"])


def final_result(page: Page) -> PageResult | None:
    accepted = [r for r in page.results if r.accepted]
    chosen = accepted or page.results
    return chosen[-1] if chosen else None


def _page_view(page: Page) -> dict[str, Any]:
    result = final_result(page)
    return {
        "number": page.page_no,
        "route": page.route,
        "mode": page.mode,
        "status": page.status,
        "attempts": page.attempts,
        "reason": page.route_reason,
        "error": page.error,
        "engine": result.engine if result else None,
        "markdown": result.markdown if result else None,
        "blocks": result.blocks if result else [],
    }
