"""Full-text search over every page's accepted text (the `page_search` index of migration 0008).

No Prefect and no server: one SQL query against our database.

- Postgres: words through the `simple` tsvector (ranked by `ts_rank_cd` over the page's
  length, so a short page dense with the words beats a long one), and any query term as
  a substring through ILIKE on the trigram index, which is what finds a CJK word inside a run
  without spaces or an Arabic word with a particle attached. Every term must occur.
- SQLite: FTS5 with the trigram tokenizer matches terms of three or more characters anywhere,
  ranked by bm25; shorter terms (a two-character CJK word) are matched with LIKE.

Ranks are higher-is-better on both stores but not comparable between them.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from infra.db.session import POSTGRES_SCHEMA

SEARCH_SCHEMA = f"{POSTGRES_SCHEMA}_search"  # Postgres: where migration 0008 put `page_search`
MARK_OPEN, MARK_CLOSE = "<mark>", "</mark>"
SNIPPET_CHARS = 160
MIN_TRIGRAM_TERM = 3  # SQLite's trigram tokenizer cannot match shorter terms
# Substring occurrences per 100 characters add this much: they order pages that only contain
# a term inside longer words (or unspaced CJK), and barely move whole-word matches.
SUBSTRING_WEIGHT = 0.001
_MARKUP = re.compile(r"<[^>]+>|[#*_`|]+")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class SearchHit:
    document_id: int
    source: str
    page_no: int
    snippet: str  # the text around the first match, every match wrapped in <mark></mark>
    rank: float


def search_pages(
    *, session: Session, query: str, limit: int = 20, document_id: int | None = None
) -> list[SearchHit]:
    """Pages whose accepted text contains every term of `query`, best first."""
    terms = query.split()
    if not terms or limit <= 0:
        return []
    if session.get_bind().dialect.name == "postgresql":
        rows = _search_postgres(session, query, terms, limit, document_id)
    else:
        rows = _search_sqlite(session, terms, limit, document_id)
    return [
        SearchHit(
            document_id=row.document_id,
            source=row.source,
            page_no=row.page_no,
            snippet=snippet(row.body, terms),
            rank=round(float(row.rank), 6),
        )
        for row in rows
    ]


def _search_postgres(
    session: Session, query: str, terms: list[str], limit: int, document_id: int | None
) -> list[Any]:
    s = POSTGRES_SCHEMA
    params: dict[str, Any] = {"query": query, "limit": limit, "document_id": document_id}
    substrings = []
    occurrences = []
    for i, term in enumerate(terms):
        params[f"like{i}"] = f"%{_escape_like(term)}%"
        params[f"term{i}"] = term.lower()
        substrings.append(f"s.body ILIKE :like{i}")
        occurrences.append(
            f"(length(s.body) - length(replace(lower(s.body), :term{i}, ''))) "
            f"/ greatest(length(:term{i}), 1) * 100.0 / (length(s.body) + 100)"
        )
    sql = f"""
        SELECT d.id AS document_id, d.source_uri AS source, p.page_no, s.body,
               ts_rank_cd(s.body_tsv, q.tsq, 2)
               + {SUBSTRING_WEIGHT} * ({" + ".join(occurrences)}) AS rank
        FROM {SEARCH_SCHEMA}.page_search s
        JOIN {s}.page p ON p.id = s.page_id
        JOIN {s}.document d ON d.id = p.document_id
        CROSS JOIN (SELECT plainto_tsquery('simple', :query) AS tsq) q
        WHERE (s.body_tsv @@ q.tsq OR ({" AND ".join(substrings)}))
          AND (CAST(:document_id AS BIGINT) IS NULL OR d.id = :document_id)
        ORDER BY rank DESC, d.id, p.page_no
        LIMIT :limit"""
    return list(session.execute(text(sql), params))


def _search_sqlite(
    session: Session, terms: list[str], limit: int, document_id: int | None
) -> list[Any]:
    params: dict[str, Any] = {"limit": limit, "document_id": document_id}
    long_terms = [t for t in terms if len(t) >= MIN_TRIGRAM_TERM]
    conditions = []
    if long_terms:
        params["match"] = " ".join('"' + t.replace('"', '""') + '"' for t in long_terms)
        conditions.append("page_search MATCH :match")
        rank = "-bm25(page_search)"
    else:
        rank = "0.0"
    occurrences = []
    for i, term in enumerate(terms):
        params[f"like{i}"] = f"%{_escape_like(term)}%"
        params[f"term{i}"] = term.lower()
        if len(term) < MIN_TRIGRAM_TERM:
            conditions.append(f"page_search.body LIKE :like{i} ESCAPE '\\'")
        occurrences.append(
            f"(length(page_search.body) - length(replace(lower(page_search.body), :term{i}, '')))"
            f" / max(length(:term{i}), 1) * 100.0 / (length(page_search.body) + 100)"
        )
    sql = f"""
        SELECT d.id AS document_id, d.source_uri AS source, p.page_no,
               page_search.body AS body,
               {rank} + {SUBSTRING_WEIGHT} * ({" + ".join(occurrences)}) AS rank
        FROM page_search
        JOIN page p ON p.id = page_search.page_id
        JOIN document d ON d.id = p.document_id
        WHERE {" AND ".join(conditions)}
          AND (:document_id IS NULL OR d.id = :document_id)
        ORDER BY rank DESC, d.id, p.page_no
        LIMIT :limit"""
    return list(session.execute(text(sql), params))


def _escape_like(term: str) -> str:
    return term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def snippet(body: str, terms: list[str], width: int = SNIPPET_CHARS) -> str:
    """About `width` characters of the page's text around the first match, markup removed,
    every occurrence of a term wrapped in <mark></mark>."""
    plain = _SPACE.sub(" ", _MARKUP.sub(" ", html.unescape(body))).strip()
    pattern = re.compile("|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True)), re.I)
    first = pattern.search(plain)
    center = first.start() if first else 0
    start = max(0, center - width // 3)
    end = min(len(plain), start + width)
    window = plain[start:end]
    marked = pattern.sub(lambda m: f"{MARK_OPEN}{m.group()}{MARK_CLOSE}", window)
    return ("…" if start > 0 else "") + marked + ("…" if end < len(plain) else "")
