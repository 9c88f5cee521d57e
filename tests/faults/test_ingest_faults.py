"""Faults during an ingest run: the process killed mid-window and mid-write, the database's
connections cut mid-run. Each ends with every page terminal exactly once: no page lost, no
duplicate row, the document's final status right."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from flows.ingest import ingest
from flows.redrive import redrive
from infra.db.models import Document, Page, PageResult
from infra.db.session import get_engine, session_scope
from tests.test_ingest import count_rows, kill_when, make_text_pdf, start_ingest, use_database

pytestmark = pytest.mark.usefixtures("prefect_server")


def audit(url: str, pages: int) -> dict[str, int]:
    """Pages lost (never terminal) and duplicate rows (pages twice, attempts twice, a page
    with other than one accepted result)."""
    with session_scope(url) as session:
        numbers = session.scalars(select(Page.page_no)).all()
        accepted = session.execute(
            select(PageResult.page_id, func.count())
            .where(PageResult.accepted)
            .group_by(PageResult.page_id)
        ).all()
        results = session.scalar(select(func.count()).select_from(PageResult))
        attempts = session.scalar(select(func.sum(Page.attempts)))
        not_done = session.scalar(select(func.count()).where(Page.status != "done"))
    lost = pages - len(set(numbers)) + not_done
    duplicates = (len(numbers) - len(set(numbers))) + (results - (attempts or 0))
    duplicates += sum(count - 1 for _, count in accepted) + (len(numbers) - len(accepted))
    return {"pages_lost": lost, "duplicates": duplicates}


@pytest.mark.parametrize("where", ["mid-window", "mid-write"])
def test_sigkilled_run_is_resumed_by_redrive_once_its_lease_runs_out(
    where: str, postgres_url: str, monkeypatch, tmp_path: Path, fault_record
) -> None:
    pages = 96
    pdf = make_text_pdf(tmp_path / "long.pdf", pages=pages, words="fault test")
    # mid-window: small windows, killed between them; mid-write: one big window, killed while
    # its pages are being written one transaction at a time.
    window, threshold = (
        ("4", lambda n: n >= 8) if where == "mid-window" else ("96", lambda n: n >= 1)
    )
    process = start_ingest(
        pdf, postgres_url, tmp_path, page_window=window, document_lease_seconds="3"
    )
    kill_when(process, lambda: threshold(count_rows(postgres_url, Page)))
    written = count_rows(postgres_url, Page)
    assert written < pages
    with session_scope(postgres_url) as session:
        assert session.scalars(select(Document.status)).one() == "running"  # the run died

    use_database(monkeypatch, postgres_url)
    time.sleep(3.5)  # the dead run's lease runs out
    [outcome] = redrive(None)

    assert outcome["status"] == "done" and outcome["redriven"] == pages - written
    figures = audit(postgres_url, pages)
    assert figures == {"pages_lost": 0, "duplicates": 0}
    fault_record(
        f"ingest-sigkill-{where}",
        fault=f"SIGKILL of `ocrflow ingest` {where}, resumed by `ocrflow redrive`",
        injected=1,
        pages_checked=pages,
        **figures,
    )
    get_engine(postgres_url).dispose()


def test_database_connections_cut_mid_run(
    postgres_url: str, monkeypatch, tmp_path: Path, fault_record
) -> None:
    pages = 160
    pdf = make_text_pdf(tmp_path / "outage.pdf", pages=pages, words="outage test")
    use_database(monkeypatch, postgres_url, page_window="16")
    database = get_engine(postgres_url).url.database
    admin = get_engine(postgres_url.rsplit("/", 1)[0] + "/postgres")
    stop, cuts = threading.Event(), []

    def cut_connections() -> None:
        # Every 0.5 s for ~10 s, once the run is writing: drop every other session's connection.
        while not stop.is_set() and count_rows(postgres_url, Page) < 10:
            time.sleep(0.05)
        for _ in range(20):
            if stop.is_set():
                return
            with admin.connect() as connection:
                killed = connection.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": database},
                ).scalar()
                connection.commit()
            cuts.append(killed)
            time.sleep(0.5)

    cutter = threading.Thread(target=cut_connections, daemon=True)
    cutter.start()
    try:
        outcomes = ingest([str(pdf)])
    finally:
        stop.set()
        cutter.join()
    admin.dispose()
    if outcomes[0]["status"] != "done":  # left incomplete by the outage: the next run resumes
        assert outcomes[0]["status"] == "incomplete"
        outcomes = ingest([str(pdf)])

    assert outcomes[0]["status"] == "done"
    assert sum(cuts) > 0, "no connection was cut"
    figures = audit(postgres_url, pages)
    assert figures == {"pages_lost": 0, "duplicates": 0}
    fault_record(
        "database-connections-terminated",
        fault="pg_terminate_backend on ocrflow's connections every 0.5 s for 10 s mid-run",
        injected=sum(cuts),
        pages_checked=pages,
        **figures,
    )
    get_engine(postgres_url).dispose()
