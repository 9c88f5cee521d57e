"""Storing a recognised document the way `ingest` does, for tests that drive the page pipeline
themselves (a scripted engine, no Prefect)."""

from __future__ import annotations

from pathlib import Path

from infra.db.repository import (
    DocumentIdentity,
    PageRecord,
    RetryPolicy,
    claim_document,
    record_page,
)
from infra.db.session import session_scope

RETRY = RetryPolicy(max_failures=3, base_seconds=1, max_seconds=10)


def store_document(pdf: Path, url: str, records: list[PageRecord]) -> int:
    """Claims `pdf` as a document and records its pages; returns the document id."""
    with session_scope(url) as session:
        claim = claim_document(
            session=session,
            identity=DocumentIdentity(
                source_uri=str(pdf),
                sha256=pdf.name.ljust(64, "0"),
                size_bytes=pdf.stat().st_size,
            ),
            pipeline_version="test",
            lease_seconds=60,
        )
        for record in records:
            record_page(session=session, document_id=claim.document_id, page=record, retry=RETRY)
        return claim.document_id
