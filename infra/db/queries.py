"""Read models for the CLI and result exports."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from infra.db.models import Document, Page, PageResult

OCR_ROUTE = "ocr"
TOKEN_TOTAL_KEYS = ("planned_vision_tokens", "vision_tokens_spent", "output_tokens")


def document_view(*, session: Session, document_id: int) -> dict[str, Any] | None:
    """A document with each page's final result (the accepted attempt, else the last one)
    and token statistics per page and in total."""
    document = session.scalars(
        select(Document)
        .where(Document.id == document_id)
        .options(
            selectinload(Document.pages)
            .selectinload(Page.results)
            .selectinload(PageResult.token_stat)
        )
    ).first()
    if document is None:
        return None
    pages = [_page_view(page) for page in document.pages]
    return {
        "id": document.id,
        "source": document.source_uri,
        "status": document.status,
        "sha256": document.sha256,
        "media_type": document.media_type,
        "page_count": document.page_count,
        "error": document.error,
        "tokens": token_totals([page["tokens"] for page in pages]),
        "pages": pages,
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
        "tokens": page_tokens(page),
    }


def page_tokens(page: Page) -> dict[str, Any]:
    """A page's token statistics (its results and their token stats loaded): the final
    result's route, planned mode, vision tokens and output tokens, and the vision tokens every
    attempt spent."""
    result = final_result(page)
    stat = result.token_stat if result is not None else None
    spent = sum(r.token_stat.vision_tokens or 0 for r in page.results if r.token_stat)
    mode = page.mode if page.route == OCR_ROUTE else None
    return {
        "route": stat.route if stat is not None else page.route,
        "mode": mode or (stat.planned_mode if stat is not None else None),
        "planned_vision_tokens": (stat.planned_vision_tokens or 0) if stat is not None else 0,
        "vision_tokens_spent": spent,
        "output_tokens": stat.output_tokens if stat is not None else None,
        "output_tokens_source": stat.output_tokens_source if stat is not None else None,
        "attempts": len(page.results),
    }


def token_totals(pages: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals of `page_tokens` rows, overall and by route."""
    by_route: dict[str, dict[str, int]] = {}
    totals = dict.fromkeys(TOKEN_TOTAL_KEYS, 0)
    for page in pages:
        route = by_route.setdefault(str(page["route"]), {"pages": 0, **totals})
        route["pages"] += 1
        for key in TOKEN_TOTAL_KEYS:
            route[key] += page[key] or 0
    for route in by_route.values():
        for key in TOKEN_TOTAL_KEYS:
            totals[key] += route[key]
    return {**totals, "by_route": by_route}
