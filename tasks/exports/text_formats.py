"""The stored results as text: markdown, plain text, one JSON document, JSON lines per page."""

from __future__ import annotations

import json
from typing import Any

from infra.db.queries import PAGE_SEPARATOR
from tasks.exports.document import ExportDocument, ExportPage
from tasks.exports.layout import plain_text

PAGE_BREAK = "\f"  # a form feed between pages, as pdftotext writes them


def render_markdown(document: ExportDocument) -> bytes:
    """Pages joined by the official page separator (as `ocrflow show` prints them)."""
    return PAGE_SEPARATOR.join(page.markdown for page in document.pages).encode()


def render_text(document: ExportDocument) -> bytes:
    """Plain text without markup, pages separated by form feeds."""
    return (PAGE_BREAK.join(plain_text(page.markdown) for page in document.pages) + "\n").encode()


def render_json(document: ExportDocument) -> bytes:
    return json.dumps(
        {**_document_fields(document), "pages": [_page_fields(p) for p in document.pages]},
        indent=2,
        ensure_ascii=False,
    ).encode()


def render_jsonl(document: ExportDocument) -> bytes:
    """One page per line, each carrying its document's id and source: rows for bulk loading."""
    head = {"document_id": document.id, "source": document.source_uri, "sha256": document.sha256}
    lines = [
        json.dumps({**head, **_page_fields(page)}, ensure_ascii=False) for page in document.pages
    ]
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _document_fields(document: ExportDocument) -> dict[str, Any]:
    return {
        "id": document.id,
        "source": document.source_uri,
        "sha256": document.sha256,
        "media_type": document.media_type,
        "status": document.status,
        "page_count": document.page_count,
    }


def _page_fields(page: ExportPage) -> dict[str, Any]:
    return {
        "page_no": page.page_no,
        "width": page.width,
        "height": page.height,
        "status": page.status,
        "route": page.route,
        "mode": page.mode,
        "engine": page.engine,
        "markdown": page.markdown,
        "text": plain_text(page.markdown),
        "blocks": page.blocks,
        "error": page.error,
    }
