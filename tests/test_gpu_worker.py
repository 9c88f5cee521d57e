"""Resident worker processes on CPU with a tiny DeepSeek-OCR checkpoint, behind a real Prefect
ingest and the real Postgres queue: the pipeline's GPU path end to end, and two workers sharing
one queue (the multi-GPU layout, one process per device)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from sqlalchemy import select

from flows.ingest import ingest
from infra.db import ocr_queue
from infra.db.models import OcrJob, OcrJobStatus, OcrWorker, Page, PageResult
from infra.db.ocr_queue import JobSpec
from infra.db.session import session_scope
from models.deepseek_ocr.engine import ENGINE_NAME
from models.queue_engine import encode_image
from tests.conftest import REPO_ROOT, SAMPLES_DIR

pytestmark = pytest.mark.slow
MAX_NEW_TOKENS = "8"


def worker_env(database_url: str, checkpoint: Path) -> dict[str, str]:
    return os.environ | {
        "OCRFLOW_DATABASE_URL": database_url,
        "OCRFLOW_MODEL_PATH": str(checkpoint),
        "OCRFLOW_MAX_NEW_TOKENS": MAX_NEW_TOKENS,
        "OMP_NUM_THREADS": "1",
    }


def start_workers(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *command, "--engine", "deepseek", "--max-batch", "2"],
        cwd=REPO_ROOT,
        env=env,
    )


def wait_for_live_workers(database_url: str, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while True:
        with session_scope(database_url) as session:
            live = ocr_queue.live_workers(session=session, within_seconds=60)
        if len(live) >= count:
            return
        assert process.poll() is None, "a worker process exited while starting"
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=120)


def test_ingest_with_the_queue_engine_runs_pages_on_the_resident_worker(
    postgres_url: str, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, prefect_server
) -> None:
    env = worker_env(postgres_url, tiny_checkpoint)
    worker = start_workers(["gpu-worker", "--device", "cpu"], env)
    try:
        wait_for_live_workers(postgres_url, 1, worker)
        monkeypatch.setenv("OCRFLOW_DATABASE_URL", postgres_url)
        monkeypatch.setenv("OCRFLOW_ENGINE", "queue")
        monkeypatch.setenv("OCRFLOW_MAX_NEW_TOKENS", MAX_NEW_TOKENS)
        [outcome] = ingest([str(SAMPLES_DIR / "scan.pdf")])
    finally:
        exit_code = stop(worker)
    assert outcome["status"] == "done", outcome
    assert exit_code == 0
    with session_scope(postgres_url) as session:
        pages = session.scalars(select(Page)).all()
        results = session.scalars(select(PageResult)).all()
        workers = session.scalars(select(OcrWorker)).all()
        leftover = session.scalars(select(OcrJob)).all()
    assert len(pages) == outcome["pages"] >= 1
    ocr_results = [r for r in results if r.route == "ocr"]
    assert ocr_results and {r.engine for r in ocr_results} == {ENGINE_NAME}
    assert {r.page_id for r in ocr_results} == {p.id for p in pages}  # every page reached it
    assert all(r.model_revision == workers[0].model_revision for r in ocr_results)
    assert workers[0].pages_done == len(ocr_results) and workers[0].stopped_at is not None
    assert leftover == []


def lined_page(index: int) -> Image.Image:
    image = Image.new("RGB", (300 + 10 * index, 400), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    for top in range(30, 370, 24):
        draw.rectangle((30, top, 260, top + 9), fill=(20, 20, 20))
    return image


def test_two_workers_share_one_queue_and_answer_each_page_once(
    postgres_url: str, tiny_checkpoint: Path
) -> None:
    env = worker_env(postgres_url, tiny_checkpoint)
    host = start_workers(["gpu-workers", "--devices", "cpu,cpu"], env)
    try:
        wait_for_live_workers(postgres_url, 2, host)
        modes = ["tiny", "small", "base", "tiny", "gundam", "small", "tiny", "base"]
        jobs = [
            JobSpec(f"p{i}", encode_image(lined_page(i)), "png", 300.0, 400.0, mode=mode)
            for i, mode in enumerate(modes)
        ]
        with session_scope(postgres_url) as session:
            ocr_queue.enqueue(session=session, batch_id="shared", jobs=jobs)
        deadline = time.monotonic() + 300
        while True:
            with session_scope(postgres_url) as session:
                counts = ocr_queue.batch_counts(session=session, batch_id="shared")
            if set(counts) <= OcrJobStatus.TERMINAL:
                break
            assert time.monotonic() < deadline, counts
            time.sleep(0.5)
    finally:
        exit_code = stop(host)
    assert exit_code == 0
    with session_scope(postgres_url) as session:
        rows = session.scalars(select(OcrJob)).all()
        workers = session.scalars(select(OcrWorker)).all()
    assert {(row.status, row.attempts) for row in rows} == {(OcrJobStatus.DONE, 1)}
    assert [row.result["mode"] for row in sorted(rows, key=lambda r: r.id)] == modes
    assert all(row.result["engine"] == ENGINE_NAME for row in rows)
    assert len(workers) == 2 and all(w.stopped_at is not None for w in workers)
    assert sum(w.pages_done for w in workers) == len(rows)  # each page answered exactly once
    assert len({row.claimed_by for row in rows}) == 2  # both workers took pages
