"""The ingest pipeline end to end: real Prefect, real Postgres and SQLite, the bundled samples."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pymupdf
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from flows.cli import app
from flows.ingest import ingest
from infra.db.models import Document, Page, PageResult
from infra.db.session import get_engine, session_scope
from tasks.fetch import DOCUMENT_SUFFIXES
from tests.conftest import REPO_ROOT, SAMPLES_DIR

pytestmark = pytest.mark.usefixtures("prefect_server")


def use_database(monkeypatch: pytest.MonkeyPatch, url: str, **settings: str) -> None:
    monkeypatch.setenv("OCRFLOW_DATABASE_URL", url)
    for name, value in settings.items():
        monkeypatch.setenv(f"OCRFLOW_{name.upper()}", value)


def make_text_pdf(path: Path, pages: int, words: str = "archive ledger entry") -> Path:
    document = pymupdf.open()
    for number in range(1, pages + 1):
        page = document.new_page()
        page.insert_text((72, 72), f"Page {number}: {words} {number}", fontsize=12)
    document.save(path)
    return path


def count_rows(url: str, model, *where) -> int:
    with session_scope(url) as session:
        return session.scalar(select(func.count()).select_from(model).where(*where))


def start_ingest(pdf: Path, url: str, tmp_path: Path, **settings: str) -> subprocess.Popen:
    """`ocrflow ingest PDF` in its own process group (so a SIGKILL takes its children too)."""
    env = {
        **os.environ,
        "OCRFLOW_DATABASE_URL": url,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        **{f"OCRFLOW_{k.upper()}": v for k, v in settings.items()},
    }
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ingest", str(pdf)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill_when(process: subprocess.Popen, ready, timeout: float = 240) -> None:
    """SIGKILL the run's process group as soon as `ready()` holds."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert process.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline, "the run never reached the fault point"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.parametrize(
    "database_url",  # SQLite ingests in the default run too (the tests below); the samples,
    ["postgres", pytest.param("sqlite", marks=pytest.mark.slow)],  # ~1 min each, on Postgres
    indirect=True,
)
def test_ingest_samples_stores_one_accepted_result_per_page(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_database(monkeypatch, database_url)
    outcomes = ingest([str(SAMPLES_DIR)])

    sample_files = [p for p in SAMPLES_DIR.iterdir() if p.suffix in DOCUMENT_SUFFIXES]
    assert len(outcomes) == len(sample_files)
    assert {o["status"] for o in outcomes} == {"done"}, outcomes
    with session_scope(database_url) as session:
        pages = session.scalars(select(Page)).all()
        assert sum(o["pages"] for o in outcomes) == len(pages)
        for page in pages:
            accepted = session.scalars(
                select(PageResult).where(PageResult.page_id == page.id, PageResult.accepted)
            ).all()
            assert len(accepted) == 1, page
            assert page.route and page.route_reason
            assert accepted[0].engine
            if page.route != "blank":
                assert accepted[0].markdown.strip(), f"no text for {page}"
        routes = {page.route for page in pages}
    assert "text-layer" in routes  # born-digital pages keep their text layer
    assert "ocr" in routes  # the scanned page, the PNG and the TIFF went through OCR


def test_parallel_run_matches_the_serial_one(sqlite_url: str, monkeypatch, tmp_path) -> None:
    """CPU worker processes, documents at once and windows in flight change nothing stored."""
    use_database(
        monkeypatch, sqlite_url, cpu_workers="2", document_concurrency="3", page_window="2"
    )
    documents = [
        make_text_pdf(tmp_path / f"doc{i}.pdf", pages=5, words=f"doc {i}") for i in range(3)
    ]
    scan = SAMPLES_DIR / "scan.pdf"
    outcomes = ingest([*map(str, documents), str(scan)])

    assert [o["source"] for o in outcomes] == [*map(str, documents), str(scan)]  # input order
    assert [(o["status"], o["pages"]) for o in outcomes] == [("done", 5)] * 3 + [("done", 1)]
    with session_scope(sqlite_url) as session:
        pages = session.scalars(select(Page).order_by(Page.document_id, Page.page_no)).all()
        texts = {
            (p.document_id, p.page_no): r.markdown
            for p in pages
            for r in session.scalars(select(PageResult).where(PageResult.page_id == p.id))
        }
    assert len(pages) == len(texts) == 16
    assert all(f"doc {i} {n}" in texts[(outcomes[i]["id"], n)] for i in range(3) for n in (1, 5))
    assert "ocr" in {p.route for p in pages}  # the scan went through the rendering workers


def test_run_publishes_progress_and_a_summary_table(
    sqlite_url: str, monkeypatch, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    use_database(monkeypatch, sqlite_url)
    pdf = make_text_pdf(tmp_path / "artifacts.pdf", pages=2, words="artifact check")
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7 not really")
    ingest([str(pdf), str(broken)])

    def latest(key: str):
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
            )
        return max(artifacts, key=lambda a: a.created)

    assert latest("ingest-progress").data == 100.0
    summary = latest("ingest-summary").data
    rows = json.loads(summary) if isinstance(summary, str) else summary
    assert {"what": "pages by route", "key": "text-layer", "count": 2} in rows
    assert {"what": "documents", "key": "failed", "count": 1} in rows
    assert "broken.pdf" in latest("ingest-failures").data


def test_reingest_same_content_is_skipped(postgres_url: str, monkeypatch, tmp_path: Path) -> None:
    use_database(monkeypatch, postgres_url)
    pdf = make_text_pdf(tmp_path / "ledger.pdf", pages=3, words="skip check")
    first = ingest([str(pdf)])
    results_before = count_rows(postgres_url, PageResult)
    copy = shutil.copy(pdf, tmp_path / "same-bytes-other-name.pdf")
    second = ingest([str(pdf), str(copy)])

    assert first[0]["status"] == "done"
    assert [o["status"] for o in second] == ["skipped", "skipped"]
    assert second[0]["id"] == first[0]["id"]
    assert count_rows(postgres_url, PageResult) == results_before


def test_bad_inputs_are_recorded_and_the_batch_goes_on(
    database_url: str, monkeypatch, tmp_path: Path
) -> None:
    use_database(monkeypatch, database_url, max_file_bytes=str(200_000))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = make_text_pdf(inputs / "good.pdf", pages=2, words="good input")
    with pymupdf.open(make_text_pdf(tmp_path / "plain.pdf", pages=1)) as plain:
        plain.save(
            inputs / "encrypted.pdf",
            encryption=pymupdf.PDF_ENCRYPT_AES_256,
            user_pw="u",
            owner_pw="o",
        )
    corrupt = inputs / "corrupt.pdf"
    corrupt.write_bytes(good.read_bytes()[:300])
    empty = inputs / "empty.pdf"
    empty.write_bytes(b"")
    text = inputs / "notes.txt"
    text.write_text("just some notes, not a document\n" * 10)
    huge = inputs / "huge.pdf"
    huge.write_bytes(b"%PDF-1.7\n" + os.urandom(250_000))

    named = [str(p) for p in sorted(inputs.iterdir())]  # named explicitly: the .txt is tried too
    outcomes = {Path(o["source"]).name: o for o in ingest(named)}

    assert outcomes["good.pdf"]["status"] == "done"
    for name in ("encrypted.pdf", "corrupt.pdf", "empty.pdf", "notes.txt", "huge.pdf"):
        assert outcomes[name]["status"] == "failed", outcomes[name]
        assert outcomes[name]["error"], name
    assert "encrypt" in outcomes["encrypted.pdf"]["error"].lower()
    assert "limit" in outcomes["huge.pdf"]["error"].lower()
    with session_scope(database_url) as session:
        failed = session.scalars(select(Document).where(Document.status == "failed")).all()
        assert len(failed) == 5 and all(d.error for d in failed)


def test_killed_run_resumes_without_duplicates_or_gaps(
    postgres_url: str, monkeypatch, tmp_path: Path
) -> None:
    pdf = make_text_pdf(tmp_path / "long.pdf", pages=60, words="resume test")
    process = start_ingest(pdf, postgres_url, tmp_path, page_window="4")
    kill_when(process, lambda: count_rows(postgres_url, Page) >= 8)
    interrupted_at = count_rows(postgres_url, Page)
    assert interrupted_at < 60

    use_database(monkeypatch, postgres_url)
    outcome = ingest([str(pdf)])[0]

    assert outcome["status"] == "done"
    with session_scope(postgres_url) as session:
        numbers = session.scalars(select(Page.page_no).order_by(Page.page_no)).all()
        assert numbers == list(range(1, 61))
        per_page = session.execute(
            select(PageResult.page_id, func.count()).group_by(PageResult.page_id)
        ).all()
        assert len(per_page) == 60 and all(count == 1 for _, count in per_page)
    get_engine(postgres_url).dispose()


def test_cli_ingest_show_and_stats_json(sqlite_url: str, monkeypatch, tmp_path: Path) -> None:
    use_database(monkeypatch, sqlite_url)
    pdf = make_text_pdf(tmp_path / "cli.pdf", pages=2, words="command line")
    runner = CliRunner()

    ingested = runner.invoke(app, ["ingest", str(pdf), "--json"])
    assert ingested.exit_code == 0, ingested.output
    outcomes = json.loads(ingested.stdout)
    assert outcomes == [
        {
            "source": str(pdf),
            "id": outcomes[0]["id"],
            "status": "done",
            "pages": 2,
            "error": None,
            "duplicate_of": None,
        }
    ]

    shown = runner.invoke(app, ["show", str(outcomes[0]["id"]), "--format", "json"])
    document = json.loads(shown.stdout)
    assert [p["number"] for p in document["pages"]] == [1, 2]
    assert "command line 2" in document["pages"][1]["markdown"]
    assert {"route", "mode", "status", "engine", "markdown", "blocks"} <= set(document["pages"][0])

    stats = json.loads(runner.invoke(app, ["stats", "--json"]).stdout)
    assert stats["documents"] == {"done": 1}
    assert stats["pages"]["total"] == 2
    assert stats["pages"]["by_route"] == {"text-layer": 2}
    assert {"by_status", "by_mode"} <= set(stats["pages"]) and "tokens" in stats


def test_cli_mode_override_sends_text_pages_to_ocr(sqlite_url: str, monkeypatch, tmp_path) -> None:
    use_database(monkeypatch, sqlite_url)
    pdf = make_text_pdf(tmp_path / "forced.pdf", pages=1, words="forced mode")
    runner = CliRunner()

    ingested = runner.invoke(app, ["ingest", str(pdf), "--mode", "large", "--json"])
    assert ingested.exit_code == 0, ingested.output
    doc_id = json.loads(ingested.stdout)[0]["id"]
    page = json.loads(runner.invoke(app, ["show", str(doc_id), "--format", "json"]).stdout)[
        "pages"
    ][0]
    assert page["route"] == "ocr" and "large: forced" in page["reason"]
    assert "forced mode" in page["markdown"].lower()


def test_cli_says_when_there_is_nothing_to_ingest_or_show(
    sqlite_url: str, monkeypatch, tmp_path: Path
) -> None:
    use_database(monkeypatch, sqlite_url)
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()

    nothing = runner.invoke(app, ["ingest", str(empty), "--json"])
    assert nothing.exit_code == 1
    assert json.loads(nothing.stdout) == []
    assert "no documents found" in nothing.stderr

    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7 not really")
    failed = runner.invoke(app, ["ingest", str(broken), "--json"])
    assert failed.exit_code == 1
    [outcome] = json.loads(failed.stdout)
    shown = runner.invoke(app, ["show", str(outcome["id"])])
    assert shown.exit_code == 1 and shown.stdout == ""
    assert f"document {outcome['id']} is failed" in shown.stderr


def test_cli_is_quiet_unless_verbose(sqlite_url: str, monkeypatch) -> None:
    import logging

    from flows.terminal import handler

    use_database(monkeypatch, sqlite_url)
    runner = CliRunner()
    for flags, level in (([], logging.WARNING), (["--verbose"], logging.INFO)):
        assert runner.invoke(app, [*flags, "stats", "--json"]).exit_code == 0
        assert handler.level == level
        assert logging.getLogger("tasks").getEffectiveLevel() == level
