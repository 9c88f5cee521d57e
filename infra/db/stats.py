"""Aggregate counts over documents, pages and token stats: `ocrflow stats` and run summaries."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from infra.db.models import Document, Page, PageResult, TokenStat


def collect_stats(
    *, session: Session, document_ids: Collection[int] | None = None
) -> dict[str, Any]:
    """Counts by status/route/mode and token totals, optionally for some documents only."""

    def scoped(query: Select, column) -> Select:
        return query if document_ids is None else query.where(column.in_(document_ids))

    def counts(query: Select) -> dict[str, int]:
        return {str(key): value for key, value in session.execute(query).all()}

    documents = counts(
        scoped(select(Document.status, func.count()), Document.id).group_by(Document.status)
    )

    def page_counts(column) -> dict[str, int]:
        return counts(scoped(select(column, func.count()), Page.document_id).group_by(column))

    by_status = page_counts(Page.status)
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
    return {
        "documents": documents,
        "pages": {
            "total": sum(by_status.values()),
            "by_status": by_status,
            "by_route": page_counts(Page.route),
            "by_mode": page_counts(Page.mode),
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
        },
    }


def document_failures(*, session: Session, document_ids: Collection[int]) -> list[tuple[str, str]]:
    rows = session.execute(
        select(Document.source_uri, Document.error).where(
            Document.id.in_(document_ids), Document.error.is_not(None)
        )
    )
    return [(source, error) for source, error in rows]
