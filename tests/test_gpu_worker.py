"""Resident worker processes on CPU with a tiny DeepSeek-OCR checkpoint, behind a real Prefect
ingest and the real Postgres queue: the pipeline's GPU path end to end, two workers sharing one
queue (the multi-GPU layout, one process per device), and the streaming worker answering each
page as it finishes and draining on stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from sqlalchemy import select

from flows.ingest import ingest
from infra.db import ocr_queue
from infra.db.models import OcrJob, OcrJobStatus, OcrWorker, Page, PageResult
from infra.db.ocr_queue import JobSpec, LeasePolicy, WorkerInfo
from infra.db.session import session_scope
from models.deepseek_ocr.engine import ENGINE_NAME, DeepseekOcrEngine
from models.queue_engine import IMAGE_FORMAT, encode_image
from services.gpu_worker import GpuWorker, WorkerConfig
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
            live = ocr_queue.live_workers(session=session)
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
            JobSpec(f"p{i}", encode_image(lined_page(i)), IMAGE_FORMAT, 300.0, 400.0, mode=mode)
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


LONG_PAGE_TOKENS = 160


@pytest.fixture(scope="module")
def streaming_engine(tiny_checkpoint: Path) -> DeepseekOcrEngine:
    """Two slots; EOS ignored, so each page decodes exactly its job's token limit."""
    torch.set_num_threads(2)
    engine = DeepseekOcrEngine.from_checkpoint(
        tiny_checkpoint, max_new_tokens=LONG_PAGE_TOKENS, max_batch=2
    )
    engine.settings = replace(engine.settings, ignore_eos=True)
    return engine


def in_process_worker(url: str, engine: DeepseekOcrEngine, *, once: bool) -> GpuWorker:
    info = WorkerInfo(
        device="cpu", engine=engine.name, model_revision=engine.model_revision, capacity=2
    )
    config = WorkerConfig(
        database_url=url,
        max_batch=2,
        policy=LeasePolicy(heartbeat_seconds=0.2),
        poll_seconds=0.05,
        once=once,
    )
    return GpuWorker(engine, info, config)


def enqueue_tiny_pages(url: str, limits: list[int]) -> None:
    jobs = [
        JobSpec(
            f"p{i}", encode_image(lined_page(i)), IMAGE_FORMAT, 300.0, 400.0, "tiny", None, limit
        )
        for i, limit in enumerate(limits)
    ]
    with session_scope(url) as session:
        ocr_queue.enqueue(session=session, batch_id="stream", jobs=jobs)


def job_rows(url: str) -> list[OcrJob]:
    with session_scope(url) as session:
        return sorted(session.scalars(select(OcrJob)).all(), key=lambda row: row.id)


def test_a_streaming_worker_answers_each_page_as_it_finishes(
    postgres_url: str, streaming_engine: DeepseekOcrEngine
) -> None:
    """Two slots, six jobs: a long page claimed first and five short ones. The short pages pass
    one by one through the slot the long page leaves free, including pages claimed after the
    first claim (two slots and one prefetched page), and each is answered as it ends, all
    before the long page: the batch is refilled across claims, not claimed in groups."""
    limits = [LONG_PAGE_TOKENS, 2, 2, 2, 2, 2]
    enqueue_tiny_pages(postgres_url, limits)

    answered = in_process_worker(postgres_url, streaming_engine, once=True).run()

    rows = job_rows(postgres_url)
    assert answered == 6
    assert {(row.status, row.attempts) for row in rows} == {(OcrJobStatus.DONE, 1)}
    assert [row.result["output_tokens"] for row in rows] == limits
    long_page, *short_pages = rows
    finished = [row.finished_at for row in short_pages]
    assert finished == sorted(finished) and len(set(finished)) == 5  # one by one, in order
    assert finished[-1] < long_page.finished_at  # p3-p5 were claimed while p0 decoded


def test_claimed_pages_are_prepared_on_several_threads(
    postgres_url: str, streaming_engine: DeepseekOcrEngine, monkeypatch
) -> None:
    """The feeder prepares a claimed chunk (image decoding, views) on a pool of threads, so it
    keeps up with a GPU that finishes tens of pages a second; each page is prepared and
    answered once, with its own output."""
    threads: set[str] = set()
    prepared: list[str] = []
    prepare = streaming_engine.prepare

    def timed_prepare(request):
        threads.add(threading.current_thread().name)
        time.sleep(0.05)  # a page's decoding and views, long enough for the others to start
        page = prepare(request)
        prepared.append(request.key)
        return page

    monkeypatch.setattr(streaming_engine, "prepare", timed_prepare)
    limits = [3, 2, 4, 2, 3, 2]
    enqueue_tiny_pages(postgres_url, limits)

    answered = in_process_worker(postgres_url, streaming_engine, once=True).run()

    rows = job_rows(postgres_url)
    assert answered == len(limits)
    assert {(row.status, row.attempts) for row in rows} == {(OcrJobStatus.DONE, 1)}
    assert [row.result["output_tokens"] for row in rows] == limits
    assert len(threads) > 1 and all(name.startswith("prepare") for name in threads)
    assert sorted(map(str, prepared)) == sorted(str(row.id) for row in rows)


def test_a_finished_page_is_answered_while_a_page_claimed_with_it_is_still_prepared(
    postgres_url: str, streaming_engine: DeepseekOcrEngine, monkeypatch
) -> None:
    """The feeder thread does not wait for a claimed chunk's preparation: a page that finishes
    meanwhile is answered at once (and the feeder goes on claiming), instead of after the
    slowest page of its chunk."""
    enqueue_tiny_pages(postgres_url, [2, 2, 2])
    first, slow, _third = (str(row.id) for row in job_rows(postgres_url))
    slow_prepared_at: list[float] = []
    prepare = streaming_engine.prepare

    def prepare_one_slowly(request):
        if request.key == slow:
            time.sleep(3.0)  # a huge page's decoding and views
            slow_prepared_at.append(time.time())
        return prepare(request)

    monkeypatch.setattr(streaming_engine, "prepare", prepare_one_slowly)

    answered = in_process_worker(postgres_url, streaming_engine, once=True).run()

    rows = {str(row.id): row for row in job_rows(postgres_url)}
    assert answered == 3 and {row.status for row in rows.values()} == {OcrJobStatus.DONE}
    assert rows[first].finished_at.timestamp() < slow_prepared_at[0]


def test_a_stopped_worker_finishes_the_pages_it_holds_and_claims_no_more(
    postgres_url: str, streaming_engine: DeepseekOcrEngine
) -> None:
    enqueue_tiny_pages(postgres_url, [40] * 6)
    worker = in_process_worker(postgres_url, streaming_engine, once=False)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not any(row.status == OcrJobStatus.CLAIMED for row in job_rows(postgres_url)):
            assert time.monotonic() < deadline, "the worker never claimed"
            time.sleep(0.05)
    finally:
        worker.request_stop()  # what SIGTERM does
        thread.join(timeout=120)
    assert not thread.is_alive()
    rows = job_rows(postgres_url)
    done = [row for row in rows if row.status == OcrJobStatus.DONE]
    untouched = [row for row in rows if (row.status, row.attempts) == (OcrJobStatus.PENDING, 0)]
    assert len(done) + len(untouched) == 6  # nothing left claimed, nothing failed
    assert len(done) >= 3 and untouched  # it finished what it held and stopped claiming
    assert all(row.result["output_tokens"] == 40 for row in done)
    with session_scope(postgres_url) as session:
        [row] = session.scalars(select(OcrWorker)).all()
        assert row.pages_done == len(done) and row.stopped_at is not None
