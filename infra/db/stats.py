"""Aggregate counts over documents, pages and token stats: `ocrflow stats` and run summaries."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, selectinload

from infra.db.models import Document, Page, PageResult, TokenStat
from infra.db.queries import OCR_ROUTE, page_tokens


def collect_stats(
    *,
    session: Session,
    document_ids: Collection[int] | None = None,
    per_page: bool | None = None,
) -> dict[str, Any]:
    """Counts by status/route/mode and token totals, optionally for some documents only.

    `tokens` keeps flat totals over every attempt (a table prints it as rows); `token_totals`
    breaks the accepted results down by route, planned mode and how output tokens were
    obtained. `per_page` (default: when documents are named) adds every page's tokens.
    """

    def scoped(query: Select, column) -> Select:
        return query if document_ids is None else query.where(column.in_(document_ids))

    def counts(query: Select) -> dict[str, int]:
        return {str(key): value for key, value in session.execute(query).all()}

    def summed(column) -> Any:
        return func.coalesce(func.sum(column), 0)

    documents = counts(
        scoped(select(Document.status, func.count()), Document.id).group_by(Document.status)
    )

    def page_counts(column) -> dict[str, int]:
        return counts(scoped(select(column, func.count()), Page.document_id).group_by(column))

    by_status = page_counts(Page.status)
    # Only OCR pages have a mode: counting the others would list them under `None`.
    by_mode = counts(
        scoped(select(Page.mode, func.count()), Page.document_id)
        .where(Page.route == OCR_ROUTE)
        .group_by(Page.mode)
    )
    accepted_tokens = scoped(
        select(
            func.count(TokenStat.id),
            func.coalesce(func.sum(TokenStat.vision_tokens), 0),
            func.coalesce(func.sum(TokenStat.valid_vision_tokens), 0),
            func.coalesce(func.sum(TokenStat.prompt_tokens), 0),
            func.coalesce(func.sum(TokenStat.output_tokens), 0),
            func.coalesce(func.sum(TokenStat.encode_ms), 0.0),
            func.coalesce(func.sum(TokenStat.decode_ms), 0.0),
        )
        .join(PageResult, TokenStat.page_result_id == PageResult.id)
        .join(Page, PageResult.page_id == Page.id),
        Page.document_id,
    )
    attempts, vision, valid, prompt, output, encode_ms, decode_ms = session.execute(
        accepted_tokens
    ).one()
    accepted = _accepted_token_totals(session, scoped, summed)
    stats = {
        "documents": documents,
        "pages": {
            "total": sum(by_status.values()),
            "by_status": by_status,
            "by_route": page_counts(Page.route),
            "by_mode": by_mode,
        },
        "tokens": {
            "attempts_with_tokens": attempts,
            "vision_tokens": vision,
            "valid_vision_tokens": valid,
            "prompt_tokens": prompt,
            "output_tokens": output,
            "compression_ratio": round(output / valid, 3) if valid else None,
            "encode_ms": round(float(encode_ms), 1),
            "decode_ms": round(float(decode_ms), 1),
            "planned_vision_tokens": accepted["planned_vision_tokens"],
            "accepted_output_tokens": accepted["output_tokens"],
        },
        "token_totals": accepted,
    }
    if per_page if per_page is not None else document_ids is not None:
        stats["by_page"] = _page_rows(session, scoped)
    return stats


def _accepted_token_totals(session: Session, scoped, summed) -> dict[str, Any]:
    """Token stats of the accepted results: totals, by route, by planned mode, by source."""
    base = (
        select()
        .select_from(TokenStat)
        .join(PageResult, TokenStat.page_result_id == PageResult.id)
        .join(Page, PageResult.page_id == Page.id)
        .where(PageResult.accepted)
    )
    columns = (
        func.count(TokenStat.id),
        summed(TokenStat.planned_vision_tokens),
        summed(TokenStat.vision_tokens),
        summed(TokenStat.output_tokens),
    )

    def grouped(key) -> dict[str, dict[str, int]]:
        rows = session.execute(scoped(base.add_columns(key, *columns), Page.document_id)
                               .group_by(key)).all()  # fmt: skip
        return {
            str(group): {
                "results": n,
                "planned_vision_tokens": planned,
                "vision_tokens": vision,
                "output_tokens": output,
            }
            for group, n, planned, vision, output in rows
        }

    by_route = grouped(TokenStat.route)
    totals = {
        key: sum(group[key] for group in by_route.values())
        for key in ("results", "planned_vision_tokens", "vision_tokens", "output_tokens")
    }
    by_source = {
        source: group["output_tokens"]
        for source, group in grouped(TokenStat.output_tokens_source).items()
    }
    by_mode = grouped(TokenStat.planned_mode)
    by_mode.pop("None", None)  # text-layer and blank results
    return {
        **totals,
        "by_route": by_route,
        "by_planned_mode": by_mode,
        "output_tokens_by_source": by_source,
    }


def _page_rows(session: Session, scoped) -> list[dict[str, Any]]:
    pages = session.scalars(
        scoped(select(Page), Page.document_id)
        .options(selectinload(Page.results).selectinload(PageResult.token_stat))
        .order_by(Page.document_id, Page.page_no)
    ).all()
    return [
        {
            "document_id": page.document_id,
            "page": page.page_no,
            "status": page.status,
            **page_tokens(page),
        }
        for page in pages
    ]


def document_failures(*, session: Session, document_ids: Collection[int]) -> list[tuple[str, str]]:
    rows = session.execute(
        select(Document.source_uri, Document.error).where(
            Document.id.in_(document_ids), Document.error.is_not(None)
        )
    )
    return [(source, error) for source, error in rows]
