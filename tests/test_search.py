"""Full-text search: the index follows accepted results through the database's own triggers,
and finds words in Latin, CJK and Arabic text on the right page, on Postgres and SQLite."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sqlalchemy import delete
from typer.testing import CliRunner

from infra.db import repository
from infra.db.models import Document, PageStatus
from infra.db.repository import AttemptRecord, DocumentIdentity, PageRecord, RetryPolicy
from infra.db.search import search_pages
from infra.db.session import session_scope
from tests.conftest import REPO_ROOT

PAGES = {
    1: "Minutes of the water committee, 14 March 1961.",
    2: "The parish ledger lists every burial.\n\n<table><tr><td>ledger</td></tr></table>",
    3: "本档案馆收藏地方志和家谱。",
    4: "تقع المكتبة الوطنية في وسط المدينة.",
}
RETRY = RetryPolicy(max_failures=3, base_seconds=1, max_seconds=1)


def attempt(markdown: str) -> AttemptRecord:
    return AttemptRecord(
        result_fields={
            "route": "ocr",
            "mode": None,
            "engine": "scripted",
            "model_revision": "test",
            "markdown": markdown,
            "blocks": [],
            "raw_output": markdown,
            "finish_reason": "eos",
            "accepted": True,
            "rejection_reason": None,
        },
        token_fields=None,
    )


def store_document(url: str, source: str, pages: dict[int, str]) -> int:
    """A document with one accepted attempt per page, written as the pipeline writes them."""
    with session_scope(url) as session:
        claim = repository.claim_document(
            session=session,
            identity=DocumentIdentity(
                source_uri=source, sha256=source.ljust(64, "0")[:64], size_bytes=1
            ),
            pipeline_version="test",
            lease_seconds=60,
        )
        for page_no, markdown in pages.items():
            record = PageRecord(
                page_no=page_no,
                width=612,
                height=792,
                fields={"route": "ocr", "status": PageStatus.DONE},
                attempts=[attempt(markdown)],
            )
            repository.record_page(
                session=session, document_id=claim.document_id, page=record, retry=RETRY
            )
        return claim.document_id


def search(url: str, query: str, **options) -> list:
    with session_scope(url) as session:
        return search_pages(session=session, query=query, **options)


def test_search_finds_each_script_on_its_page(database_url: str) -> None:
    document_id = store_document(database_url, "/archive/mixed.pdf", PAGES)
    store_document(database_url, "/archive/other.pdf", {1: "Nothing relevant here."})

    for query, page_no in [
        ("committee", 1),
        ("LEDGER", 2),
        ("water committee", 1),
        ("档案馆", 3),  # a word inside a CJK run without spaces
        ("家谱", 3),  # two characters: below SQLite's trigram length
        ("المكتبة", 4),
    ]:
        hits = search(database_url, query)
        assert [(h.document_id, h.page_no) for h in hits] == [(document_id, page_no)], query
        assert hits[0].source == "/archive/mixed.pdf"
        assert "<mark>" in hits[0].snippet and hits[0].rank > 0

    assert search(database_url, "ledger")[0].snippet.count("<mark>") == 2
    assert search(database_url, "committee burial") == []  # every term must be on the page


def test_search_ranks_and_filters_by_document(database_url: str) -> None:
    dense = store_document(database_url, "/a.pdf", {1: "ledger ledger ledger of accounts"})
    sparse = store_document(database_url, "/b.pdf", {1: "a ledger among many other words " * 5})
    hits = search(database_url, "ledger")
    assert [h.document_id for h in hits] == [dense, sparse]
    assert hits[0].rank > hits[1].rank
    assert [h.document_id for h in search(database_url, "ledger", document_id=sparse)] == [sparse]
    assert len(search(database_url, "ledger", limit=1)) == 1


def test_index_follows_superseded_and_deleted_results(database_url: str) -> None:
    document_id = store_document(database_url, "/redriven.pdf", {1: "first reading: quarry"})
    with session_scope(database_url) as session:  # a redrive accepts a new attempt
        record = PageRecord(
            page_no=1,
            width=612,
            height=792,
            fields={"route": "ocr", "status": PageStatus.DONE},
            attempts=[attempt("second reading: quarrel")],
        )
        repository.record_page(session=session, document_id=document_id, page=record, retry=RETRY)
    assert search(database_url, "quarry") == []
    assert [h.page_no for h in search(database_url, "quarrel")] == [1]

    with session_scope(database_url) as session:
        session.execute(delete(Document).where(Document.id == document_id))
    assert search(database_url, "quarrel") == []


def test_cli_search_json(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.cli import app

    monkeypatch.setenv("OCRFLOW_DATABASE_URL", database_url)
    document_id = store_document(database_url, "/archive/mixed.pdf", PAGES)
    result = CliRunner().invoke(app, ["search", "档案馆", "--json", "--document", str(document_id)])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert [(h["document_id"], h["page_no"]) for h in hits] == [(document_id, 3)]
    assert set(hits[0]) == {"document_id", "source", "page_no", "snippet", "rank"}
    assert "<mark>档案馆</mark>" in hits[0]["snippet"]

    missing = CliRunner().invoke(app, ["search", "absent-word"])
    assert missing.exit_code == 1


def test_search_path_imports_no_prefect(sqlite_url: str) -> None:
    code = (
        "import sys\n"
        "from infra.db.search import search_pages\n"
        "from infra.db.session import session_scope\n"
        "import flows.export_commands\n"
        f"with session_scope({sqlite_url!r}) as s: search_pages(session=s, query='x')\n"
        "assert not [m for m in sys.modules if m.startswith('prefect')], 'prefect imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
