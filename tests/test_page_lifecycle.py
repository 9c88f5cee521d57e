"""The page lifecycle: transient faults leave pages retrying (never failed, never done), bad
pages fail alone, writes are idempotent, and `redrive` finishes what is left."""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from flows.cli import app
from flows.ingest import ingest
from flows.redrive import redrive
from infra.db.models import Document, Page, PageResult
from infra.db.repository import (
    AttemptRecord,
    DocumentIdentity,
    PageRecord,
    RetryPolicy,
    claim_document,
    finish_document,
    record_page,
    record_pages,
    set_page_count,
)
from infra.db.session import session_scope
from tests.conftest import SAMPLES_DIR
from tests.test_ingest import make_text_pdf, use_database

RETRY = RetryPolicy(max_failures=3, base_seconds=10, max_seconds=25)


def _attempt(*, accepted: bool, finish: str = "eos", text: str = "text") -> AttemptRecord:
    return AttemptRecord(
        result_fields={
            "route": "ocr",
            "mode": None,
            "engine": "test",
            "model_revision": "1",
            "markdown": text,
            "blocks": [],
            "raw_output": text,
            "finish_reason": finish,
            "accepted": accepted,
            "rejection_reason": None if accepted else "test",
        },
        token_fields=None,
    )


def _page(status: str, attempts: list[AttemptRecord], error: str | None = None) -> PageRecord:
    return PageRecord(1, 100.0, 100.0, {"status": status, "error": error}, attempts)


def _document(url: str, page_count: int = 1) -> int:
    with session_scope(url) as session:
        claim = claim_document(
            session=session,
            identity=DocumentIdentity(source_uri="/tmp/x.pdf", sha256="a" * 64, size_bytes=1),
            pipeline_version="test",
            lease_seconds=60,
        )
        set_page_count(
            session=session, document_id=claim.document_id, page_count=page_count, media_type="x"
        )
        return claim.document_id


def _write(url: str, document_id: int, record: PageRecord) -> Page:
    with session_scope(url) as session:
        return record_page(session=session, document_id=document_id, page=record, retry=RETRY)


# -- the store -------------------------------------------------------------------------------


def test_writing_a_page_twice_adds_no_rows(database_url: str) -> None:
    document_id = _document(database_url)
    record = _page("done", [_attempt(accepted=False), _attempt(accepted=True)])
    _write(database_url, document_id, record)
    _write(database_url, document_id, record)  # a retried persist after a dropped connection

    with session_scope(database_url) as session:
        results = session.scalars(select(PageResult).order_by(PageResult.attempt)).all()
        page = session.scalars(select(Page)).one()
    assert [r.attempt for r in results] == [1, 2]
    assert [r.accepted for r in results] == [False, True]
    assert page.attempts == 2


def test_schema_refuses_duplicate_attempts_and_two_accepted_results(database_url: str) -> None:
    document_id = _document(database_url)
    _write(database_url, document_id, _page("done", [_attempt(accepted=True)]))
    with session_scope(database_url) as session:
        first = session.scalars(select(PageResult)).one()
        columns = {
            c.key: getattr(first, c.key) for c in PageResult.__table__.columns if c.key != "id"
        }
    with pytest.raises(IntegrityError), session_scope(database_url) as session:
        session.add(PageResult(**{**columns, "attempt": 2}))  # same attempt key
    with pytest.raises(IntegrityError), session_scope(database_url) as session:
        session.add(PageResult(**{**columns, "attempt": 3, "attempt_key": "another"}))


def test_a_later_accepted_attempt_supersedes_the_earlier_one(database_url: str) -> None:
    document_id = _document(database_url)
    _write(database_url, document_id, _page("done", [_attempt(accepted=True, text="old")]))
    _write(database_url, document_id, _page("done", [_attempt(accepted=True, text="new")]))
    with session_scope(database_url) as session:
        accepted = session.scalars(select(PageResult).where(PageResult.accepted)).all()
    assert [r.markdown for r in accepted] == ["new"]


def test_pages_written_together_match_pages_written_one_by_one(database_url: str) -> None:
    """One statement set for several pages: new and stored pages mixed, each page's attempts
    numbered on from its own, a new acceptance superseding only its own page's, retries
    counted per page, and a repeat of the whole lot adding nothing."""
    document_id = _document(database_url, page_count=3)
    _write(database_url, document_id, _page("done", [_attempt(accepted=True, text="p1 old")]))
    retrying = PageRecord(
        2, 100.0, 100.0, {"status": "retrying", "error": "away"}, [_attempt(accepted=False)]
    )
    _write(database_url, document_id, retrying)
    lot = [
        PageRecord(1, 100.0, 100.0, {"status": "done"}, [_attempt(accepted=True, text="p1 new")]),
        PageRecord(
            2,
            100.0,
            100.0,
            {"status": "retrying", "error": "away"},
            [*retrying.attempts, _attempt(accepted=False, finish="error")],
        ),
        PageRecord(3, 100.0, 100.0, {"status": "done"}, [_attempt(accepted=True, text="p3")]),
    ]
    for _ in range(2):  # the second is a retried write after a dropped connection
        with session_scope(database_url) as session:
            rows = record_pages(session=session, document_id=document_id, pages=lot, retry=RETRY)
            assert [row.page_no for row in rows] == [1, 2, 3]

    with session_scope(database_url) as session:
        pages = {p.page_no: p for p in session.scalars(select(Page))}
        results = session.execute(
            select(Page.page_no, PageResult.attempt, PageResult.accepted, PageResult.markdown)
            .join(Page, Page.id == PageResult.page_id)
            .order_by(Page.page_no, PageResult.attempt)
        ).all()
    assert [tuple(r) for r in results] == [
        (1, 1, False, "p1 old"),
        (1, 2, True, "p1 new"),
        (2, 1, False, "text"),
        (2, 2, False, "text"),
        (3, 1, True, "p3"),
    ]
    assert {n: (p.attempts, p.failures, p.status) for n, p in pages.items()} == {
        1: (2, 0, "done"),
        2: (2, 1, "retrying"),
        3: (1, 0, "done"),
    }
    assert pages[2].next_attempt_at is not None
    with pytest.raises(ValueError), session_scope(database_url) as session:
        record_pages(session=session, document_id=document_id, pages=[lot[0], lot[0]], retry=RETRY)


def test_transient_failures_back_off_then_end_failed_with_the_reason(database_url: str) -> None:
    document_id = _document(database_url)
    waits = []
    for failure in range(1, RETRY.max_failures + 1):
        record = _page(
            "retrying", [_attempt(accepted=False, finish="error")], f"worker away {failure}"
        )
        before = time.time()
        page = _write(database_url, document_id, record)
        assert page.failures == failure
        if failure < RETRY.max_failures:
            assert page.status == "retrying"
            waits.append(round(page.next_attempt_at.timestamp() - before))
        with session_scope(database_url) as session:
            status = finish_document(session=session, document_id=document_id)
        assert status == ("incomplete" if failure < RETRY.max_failures else "failed")
    assert waits == [10, 20]  # base, then doubled (the cap is 25)
    assert page.status == "failed" and page.next_attempt_at is None
    assert "worker away 3" in page.error and "gave up after 3" in page.error


def test_document_status_follows_its_pages(database_url: str) -> None:
    document_id = _document(database_url, page_count=2)
    _write(database_url, document_id, _page("done", [_attempt(accepted=True)]))
    with session_scope(database_url) as session:  # page 2 never recorded: a run that stopped
        assert finish_document(session=session, document_id=document_id) == "incomplete"
        assert "1 of 2 pages unfinished" in session.get_one(Document, document_id).error
    second = PageRecord(2, 1.0, 1.0, {"status": "needs_review", "error": None}, [])
    _write(database_url, document_id, second)
    with session_scope(database_url) as session:
        assert finish_document(session=session, document_id=document_id) == "done"


# -- the pipeline ------------------------------------------------------------------------------

pytestmark_prefect = pytest.mark.usefixtures("prefect_server")


def _cbz_with_a_broken_page(path: Path) -> Path:
    image = io.BytesIO()
    Image.new("RGB", (400, 300), "white").save(image, "PNG")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("001.png", image.getvalue())
        archive.writestr("002.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
        archive.writestr("003.png", image.getvalue())
    return path


@pytestmark_prefect
def test_an_unreadable_page_fails_alone(sqlite_url: str, monkeypatch, tmp_path: Path) -> None:
    use_database(monkeypatch, sqlite_url)
    [outcome] = ingest([str(_cbz_with_a_broken_page(tmp_path / "comic.cbz"))])

    assert outcome["status"] == "failed" and outcome["pages"] == 3
    assert "1 of 3 pages failed; page 2" in outcome["error"]
    with session_scope(sqlite_url) as session:
        pages = session.scalars(select(Page).order_by(Page.page_no)).all()
    assert [p.status for p in pages] == ["done", "failed", "done"]
    assert "page 2" in pages[1].error


@pytestmark_prefect
def test_no_gpu_worker_leaves_pages_retrying_and_redrive_finishes_them(
    postgres_url: str, monkeypatch, tmp_path: Path
) -> None:
    scan = SAMPLES_DIR / "scan.pdf"
    use_database(monkeypatch, postgres_url, engine="queue", queue_worker_grace_seconds="3")
    runner = CliRunner()

    started = time.monotonic()
    first = runner.invoke(app, ["ingest", str(scan), "--json"])
    elapsed = time.monotonic() - started
    [outcome] = json.loads(first.stdout)
    assert first.exit_code == 1, first.output
    assert outcome["status"] == "incomplete" and "unfinished" in outcome["error"]
    assert elapsed < 60, f"one grace period in all, took {elapsed:.0f} s"
    with session_scope(postgres_url) as session:
        pages = session.scalars(select(Page)).all()
        assert pages and {p.status for p in pages} == {"retrying"}
        assert all(p.failures == 1 and p.next_attempt_at is not None for p in pages)
        assert session.scalar(select(func.count()).where(PageResult.accepted)) == 0

    again = json.loads(runner.invoke(app, ["ingest", str(scan), "--json"]).stdout)
    assert again[0]["status"] == "incomplete"  # resumed, not skipped

    monkeypatch.setenv("OCRFLOW_ENGINE", "rapidocr")
    redriven = runner.invoke(app, ["redrive", "--json"])
    assert redriven.exit_code == 0, redriven.output
    [result] = json.loads(redriven.stdout)
    assert result == {
        "id": outcome["id"],
        "status": "done",
        "pages": 1,
        "redriven": 1,
        "error": None,
    }
    with session_scope(postgres_url) as session:
        page = session.scalars(select(Page)).one()
        results = session.scalars(select(PageResult).order_by(PageResult.attempt)).all()
    assert page.status == "done"
    assert [r.finish_reason for r in results] == ["error", "error", "eos"]
    assert [r.accepted for r in results] == [False, False, True]


@pytestmark_prefect
def test_redrive_reruns_selected_statuses_and_reports_each_document(
    sqlite_url: str, monkeypatch, tmp_path: Path
) -> None:
    use_database(monkeypatch, sqlite_url)
    pdf = make_text_pdf(tmp_path / "ledger.pdf", pages=2, words="redrive check")
    [outcome] = ingest([str(pdf)])
    runner = CliRunner()

    nothing = runner.invoke(app, ["redrive", str(outcome["id"]), "--json"])
    assert nothing.exit_code == 0
    assert json.loads(nothing.stdout)[0]["redriven"] == 0  # no failed pages

    again = json.loads(
        runner.invoke(app, ["redrive", str(outcome["id"]), "--status", "done", "--json"]).stdout
    )
    assert again == [
        {"id": outcome["id"], "status": "done", "pages": 2, "redriven": 2, "error": None}
    ]
    with session_scope(sqlite_url) as session:
        assert session.scalar(select(func.count()).select_from(PageResult)) == 4
        assert session.scalar(select(func.count()).where(PageResult.accepted)) == 2

    missing = runner.invoke(app, ["redrive", "999999", "--json"])
    assert missing.exit_code == 1
    assert json.loads(missing.stdout)[0]["error"] == "no such document"

    pdf.write_bytes(make_text_pdf(tmp_path / "other.pdf", pages=1).read_bytes())
    changed = runner.invoke(app, ["redrive", str(outcome["id"]), "--json"])
    assert changed.exit_code == 1 and "changed" in json.loads(changed.stdout)[0]["error"]

    bad = runner.invoke(app, ["redrive", "--status", "bogus"])
    assert bad.exit_code == 2


@pytestmark_prefect
def test_redrive_is_a_deployable_flow_with_the_same_parameters() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.deployments import build_deployments

    [deployment] = [d for d in build_deployments([]) if d.name == "redrive"]
    assert deployment.flow_name == redrive.name == "redrive"
    assert set(parameter_schema(redrive).properties) == {"document_ids", "statuses", "mode"}
