"""The pipeline phase of `bench.e2e_gpu`: `ocrflow ingest` over the corpus in its own process,
as a user runs it, its progress while it runs, and what it stored.

The timing starts when the command starts (process start-up, Prefect client and flow runs
included) and ends at the last result stored, read back from our tables; a run stopped at its
deadline is timed to the stop.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from bench.e2e_services import Sampler, stop_process
from infra.db.models import (
    ERROR_FINISH,
    Document,
    OcrJob,
    OcrJobStatus,
    Page,
    PageResult,
    TokenStat,
)
from infra.db.session import session_scope

REPO_ROOT = Path(__file__).resolve().parents[1]
PROGRESS_EVERY_S = 5


def database_progress(database_url: str) -> dict[str, int]:
    """Pages by status, OCR attempts stored so far, and the GPU queue's pages waiting for a
    worker (`queue_pending`) and held by one (`queue_claimed`): a worker short of pages shows
    as `queue_pending` 0 with `queue_claimed` under its slots."""
    with session_scope(database_url) as session:
        rows = session.execute(select(Page.status, func.count()).group_by(Page.status)).all()
        statuses = {status: count for status, count in rows}
        ocr = session.scalar(select(func.count()).where(PageResult.route == "ocr"))
        jobs = dict(
            session.execute(
                select(OcrJob.status, func.count())
                .where(OcrJob.status.in_((OcrJobStatus.PENDING, OcrJobStatus.CLAIMED)))
                .group_by(OcrJob.status)
            ).all()
        )
    return {
        **statuses,
        "ocr_results": ocr or 0,
        "queue_pending": jobs.get(OcrJobStatus.PENDING, 0),
        "queue_claimed": jobs.get(OcrJobStatus.CLAIMED, 0),
    }


def run_pipeline(
    pdfs: list[Path],
    env: dict[str, str],
    work: Path,
    database_url: str,
    deadline: float,
    sampler: Sampler,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """`ocrflow ingest` over the corpus in its own process, stopped at `deadline`. `progress`
    keeps what was stored at each report (seconds after the start): results should accumulate
    from the first seconds on, not arrive in a burst at the end."""
    # --verbose: the log then says, with times, where the ingest run's start-up and pages go.
    command = [sys.executable, "-m", "flows.cli", "--verbose", "ingest", *map(str, pdfs), "--json"]
    stdout = (work / "ingest.json").open("w")
    stderr = (work / "ingest.log").open("w")
    started = time.time()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=stdout, stderr=stderr)
    sampler.roots["ingest"] = process.pid
    log(f"ingest started: {len(pdfs)} documents (deadline in {deadline - started:.0f} s)")
    next_report, cut = started + PROGRESS_EVERY_S, None
    reports: list[dict[str, Any]] = []
    while process.poll() is None:
        time.sleep(0.5)
        now = time.time()
        if now >= next_report:
            next_report = now + PROGRESS_EVERY_S
            with contextlib.suppress(Exception):
                progress = database_progress(database_url)
                reports.append({"s": round(now - started, 1), **progress})
                busy = sampler.busy_fraction(now - PROGRESS_EVERY_S, now)
                busy_text = f", GPU busy {busy:.0%}" if busy is not None else ""
                log(f"pipeline: {json.dumps(progress)}{busy_text}")
        if now >= deadline and cut is None:
            log("pipeline: time budget reached, stopping ingest")
            cut = now
            stop_process(process, grace=5)
    ended = time.time()
    log(f"ingest exited with {process.returncode} after {ended - started:.1f} s")
    return {
        "started": started,
        "exited": ended,
        "exit_code": process.returncode,
        "cut_at": cut,
        "progress": reports,
    }


def pipeline_outcome(database_url: str, started: float) -> dict[str, Any]:
    """What the run stored: pages by route, mode and status, OCR attempts, rejections, output
    tokens, when the first document was registered (process start, Prefect's flow and subflow
    runs) and when the first and last results were stored (seconds after `started`)."""
    with session_scope(database_url) as session:
        corpus_pages = session.scalar(select(func.sum(Document.page_count))) or 0
        pages = session.execute(select(Page.status, Page.route, Page.mode)).all()
        ocr = (PageResult.route == "ocr") & (PageResult.finish_reason != ERROR_FINISH)
        attempts = session.execute(
            select(PageResult.page_id, PageResult.rejection_reason).where(ocr)
        ).all()
        tokens = session.execute(
            select(func.avg(TokenStat.output_tokens), func.sum(TokenStat.output_tokens))
            .join(PageResult, TokenStat.page_result_id == PageResult.id)
            .where(ocr)
        ).one()
        first_registered = session.scalar(select(func.min(Document.created_at)))
        first_ocr, last = session.execute(
            select(
                func.min(PageResult.created_at).filter(PageResult.route == "ocr"),
                func.max(PageResult.created_at),
            )
        ).one()
        errors = session.scalar(
            select(func.count()).where(PageResult.finish_reason == ERROR_FINISH)
        )
    terminal = [page for page in pages if page.status in ("done", "needs_review", "failed")]
    routes = Counter(
        f"{page.route}/{page.mode}" if page.mode else str(page.route) for page in terminal
    )
    rejections = Counter(
        reason.split(":")[0].split("(")[0].strip() for _, reason in attempts if reason
    )
    return {
        "corpus_pages_registered": corpus_pages,
        "pages_terminal": len(terminal),
        "pages_by_status": dict(Counter(page.status for page in pages)),
        "routes": dict(sorted(routes.items())),
        "ocr_attempts": len(attempts),
        "ocr_pages_distinct": len({page_id for page_id, _ in attempts}),
        "ocr_attempts_failed": errors or 0,
        "rejections": dict(rejections),
        "output_tokens_per_page_mean": float(tokens[0]) if tokens[0] is not None else None,
        "output_tokens": int(tokens[1] or 0),
        "first_document_registered_s": _seconds_after(first_registered, started),
        "first_ocr_stored_s": _seconds_after(first_ocr, started),
        "last_stored_s": _seconds_after(last, started),
    }


def _seconds_after(moment: dt.datetime | None, started: float) -> float | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp() - started


__all__ = ["database_progress", "pipeline_outcome", "run_pipeline"]
