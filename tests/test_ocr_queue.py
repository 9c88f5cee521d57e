"""The GPU work queue on the real Postgres: claims, leases, crashes, and the queue engine."""

from __future__ import annotations

import multiprocessing
import threading
import time
from dataclasses import dataclass

import pytest
from PIL import Image
from sqlalchemy import select

from infra.db import ocr_queue
from infra.db.models import OcrJob, OcrJobStatus, OcrWorker
from infra.db.ocr_queue import JobSpec, QueueTimeoutError, WorkerInfo
from infra.db.session import session_scope
from infra.vocabulary import Mode
from models.engine import FinishReason, OcrRequest, OcrResult
from models.queue_engine import QueueEngine, encode_image
from services.gpu_worker import GpuWorker, WorkerConfig


@dataclass
class SizeEchoEngine:
    """A scripted engine: answers each page with its pixel size and mode, after `delay` s."""

    delay: float = 0.0
    name: str = "size-echo"
    model_revision: str = "test"

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]:
        time.sleep(self.delay)
        return [
            OcrResult(
                key=request.key,
                markdown=f"{request.image.width}x{request.image.height} {request.mode}",
                blocks=[],
                raw_output="",
                finish_reason=FinishReason.EOS,
                engine=self.name,
                model_revision=self.model_revision,
                mode=request.mode,
                output_tokens=7,
            )
            for request in requests
        ]


def page_job(index: int) -> JobSpec:
    """A page whose answer names it: width 100 + index."""
    image = Image.new("L", (100 + index, 40), 255)
    return JobSpec(f"page-{index}", encode_image(image), "png", 612.0, 792.0, mode="tiny")


def enqueue_pages(url: str, count: int, batch_id: str = "batch") -> list[int]:
    with session_scope(url) as session:
        return ocr_queue.enqueue(
            session=session, batch_id=batch_id, jobs=[page_job(i) for i in range(count)]
        )


def jobs_by_key(url: str) -> dict[str, OcrJob]:
    with session_scope(url) as session:
        return {job.request_key: job for job in session.scalars(select(OcrJob))}


def make_worker(url: str, engine, *, max_batch: int = 4, lease: float = 60.0, once=True):
    info = WorkerInfo(device="cpu", engine=engine.name, model_revision="test", capacity=max_batch)
    config = WorkerConfig(
        database_url=url,
        max_batch=max_batch,
        lease_seconds=lease,
        poll_seconds=0.05,
        heartbeat_seconds=0.2,
        once=once,
    )
    return GpuWorker(engine, info, config)


def test_concurrent_claims_never_double_claim(postgres_url: str) -> None:
    job_ids = enqueue_pages(postgres_url, 60)
    claimed: dict[str, list[int]] = {}

    def claim_until_empty(worker_id: str) -> None:
        mine = claimed.setdefault(worker_id, [])
        while True:
            with session_scope(postgres_url) as session:
                jobs = ocr_queue.claim_batch(session=session, worker_id=worker_id, limit=4)
            if not jobs:
                return
            mine.extend(job.id for job in jobs)

    threads = [threading.Thread(target=claim_until_empty, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    all_claims = [job_id for ids in claimed.values() for job_id in ids]
    assert sorted(all_claims) == sorted(job_ids)  # every job once, none twice
    assert sum(1 for ids in claimed.values() if ids) > 1  # the claims were really concurrent
    jobs = jobs_by_key(postgres_url).values()
    assert {(job.status, job.attempts) for job in jobs} == {(OcrJobStatus.CLAIMED, 1)}


def test_expired_leases_are_reclaimed_and_only_the_holder_answers(database_url: str) -> None:
    [job_id] = enqueue_pages(database_url, 1)
    with session_scope(database_url) as session:
        [first] = ocr_queue.claim_batch(session=session, worker_id="a", limit=5, lease_seconds=0)
        assert ocr_queue.claim_batch(session=session, worker_id="b", limit=5) == []
    time.sleep(0.01)
    with session_scope(database_url) as session:
        assert ocr_queue.reclaim_stale(session=session, max_attempts=2) == 1
        [second] = ocr_queue.claim_batch(session=session, worker_id="b", limit=5, lease_seconds=0)
    assert first.id == second.id == job_id and second.attempts == 2
    assert second.spec.image == page_job(0).image  # the image survives a reclaim
    with session_scope(database_url) as session:  # "a" lost its lease: its answer is dropped
        assert not ocr_queue.complete(session=session, worker_id="a", job_id=job_id, result={})
        assert ocr_queue.complete(session=session, worker_id="b", job_id=job_id, result={"x": 1})
        assert not ocr_queue.complete(session=session, worker_id="b", job_id=job_id, result={})
    job = jobs_by_key(database_url)["page-0"]
    assert (job.status, job.result, job.image) == (OcrJobStatus.DONE, {"x": 1}, None)


def test_a_page_that_outlives_every_lease_fails_after_max_attempts(postgres_url: str) -> None:
    enqueue_pages(postgres_url, 1)
    for attempt in (1, 2):
        with session_scope(postgres_url) as session:
            ocr_queue.reclaim_stale(session=session, max_attempts=2)
            [job] = ocr_queue.claim_batch(
                session=session, worker_id=f"w{attempt}", limit=1, lease_seconds=0
            )
            assert job.attempts == attempt
        time.sleep(0.01)
    with session_scope(postgres_url) as session:
        ocr_queue.reclaim_stale(session=session, max_attempts=2)
        assert ocr_queue.claim_batch(session=session, worker_id="w3", limit=1) == []
        [outcome] = ocr_queue.collect(session=session, batch_id="batch")
    assert outcome.status == OcrJobStatus.FAILED and "lease expired" in outcome.error


def serve_slowly(url: str) -> None:
    """A worker process whose engine takes long enough to be killed mid-batch."""
    make_worker(url, SizeEchoEngine(delay=60), lease=2.0, once=False).run()


def test_worker_killed_mid_batch_loses_no_page_and_answers_each_once(postgres_url: str) -> None:
    enqueue_pages(postgres_url, 6)
    spawn = multiprocessing.get_context("spawn")
    process = spawn.Process(target=serve_slowly, args=(postgres_url,))
    process.start()
    try:
        deadline = time.monotonic() + 60
        while not any(j.status == OcrJobStatus.CLAIMED for j in jobs_by_key(postgres_url).values()):
            assert time.monotonic() < deadline, "the worker never claimed"
            time.sleep(0.1)
        process.kill()  # SIGKILL mid-batch: no clean-up runs
        process.join()
    finally:
        process.kill()
    held = {k for k, j in jobs_by_key(postgres_url).items() if j.status == OcrJobStatus.CLAIMED}
    assert len(held) == 5  # its batch capacity (4) and one prefetched page, not the queue

    time.sleep(2.1)  # its leases expire
    answered = make_worker(postgres_url, SizeEchoEngine()).run()

    jobs = jobs_by_key(postgres_url)
    assert answered == 6
    for index in range(6):
        job = jobs[f"page-{index}"]
        assert job.status == OcrJobStatus.DONE
        assert job.result["markdown"] == f"{100 + index}x40 tiny"
        assert job.attempts == (2 if job.request_key in held else 1)


def test_queue_engine_round_trip_through_a_worker(database_url: str) -> None:
    worker = make_worker(database_url, SizeEchoEngine(), max_batch=2, once=False)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        requests = [
            OcrRequest(str(n), Image.new("RGB", (50 + n, 30)), mode, 612.0, 792.0, 100 * n)
            for n, mode in enumerate([Mode.GUNDAM, Mode.TINY, Mode.BASE, None, Mode.SMALL])
        ]
        engine = QueueEngine(database_url, worker_grace_seconds=30, poll_seconds=0.05)
        results = engine.recognize(requests)
    finally:
        worker.request_stop()
        thread.join()
    assert [r.key for r in results] == [r.key for r in requests]
    for request, result in zip(requests, results, strict=True):
        assert result.markdown == f"{request.image.width}x30 {request.mode}"
        assert (result.engine, result.mode, result.output_tokens) == ("size-echo", request.mode, 7)
    assert jobs_by_key(database_url) == {}  # collected batches leave no rows behind
    with session_scope(database_url) as session:
        [row] = session.scalars(select(OcrWorker)).all()
        assert row.pages_done == 5 and row.stopped_at is not None


def test_queue_engine_fails_fast_without_a_worker(postgres_url: str) -> None:
    engine = QueueEngine(postgres_url, worker_grace_seconds=0.3, poll_seconds=0.05)
    request = OcrRequest("1", Image.new("RGB", (20, 20)), Mode.TINY, 612.0, 792.0)
    with pytest.raises(QueueTimeoutError, match="no live GPU worker"):
        engine.recognize([request])
    assert jobs_by_key(postgres_url) == {}  # the abandoned batch is cancelled
