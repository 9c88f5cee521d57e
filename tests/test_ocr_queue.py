"""The GPU work queue on the real Postgres: claims, leases, crashes, and the queue engine."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta

import pytest
from PIL import Image
from sqlalchemy import select, update

from infra.db import ocr_queue
from infra.db.models import OcrJob, OcrJobStatus, OcrWorker
from infra.db.ocr_queue import JobSpec, LeasePolicy, WorkerInfo
from infra.db.session import session_scope
from infra.errors import EngineUnavailable, TransientError
from infra.vocabulary import Mode
from models.engine import FinishReason, OcrRequest, OcrResult, PartialBatchError
from models.queue_engine import (
    IMAGE_FORMAT,
    OcrJobFailedError,
    OcrJobLostError,
    QueueEngine,
    encode_image,
    result_to_dict,
)
from services.gpu_worker import GpuWorker, WorkerConfig
from tests.conftest import url_new_to_this_process


@pytest.fixture
def fresh_queue_url(database_url: str, request: pytest.FixtureRequest) -> str:
    return url_new_to_this_process(database_url, request)


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
    return JobSpec(f"page-{index}", encode_image(image), IMAGE_FORMAT, 612.0, 792.0, mode="tiny")


def enqueue_pages(url: str, count: int, batch_id: str = "batch") -> list[int]:
    with session_scope(url) as session:
        return ocr_queue.enqueue(
            session=session, batch_id=batch_id, jobs=[page_job(i) for i in range(count)]
        )


def jobs_by_key(url: str) -> dict[str, OcrJob]:
    with session_scope(url) as session:
        return {job.request_key: job for job in session.scalars(select(OcrJob))}


def beat(url: str, worker_id: str) -> None:
    """A heartbeat of a worker that holds nothing (how the CPU side sees a live worker)."""
    info = WorkerInfo(device="cpu", engine="hand", model_revision="test", capacity=1)
    info.worker_id = worker_id
    with session_scope(url) as session:
        ocr_queue.heartbeat(session=session, worker=info)


def wait_until_live(url: str, count: int = 1) -> None:
    deadline = time.monotonic() + 30
    while True:
        with session_scope(url) as session:
            if len(ocr_queue.live_workers(session=session)) >= count:
                return
        assert time.monotonic() < deadline, "the worker never beat"
        time.sleep(0.02)


def make_worker(url: str, engine, *, max_batch: int = 4, lease: float = 60.0, once=True):
    info = WorkerInfo(device="cpu", engine=engine.name, model_revision="test", capacity=max_batch)
    config = WorkerConfig(
        database_url=url,
        max_batch=max_batch,
        policy=LeasePolicy(lease_seconds=lease, heartbeat_seconds=0.2),
        poll_seconds=0.05,
        once=once,
    )
    return GpuWorker(engine, info, config)


def test_claims_take_the_lowest_priority_value_first_then_the_oldest(database_url: str) -> None:
    """An escalated page (priority: when it was first queued) goes ahead of later pages."""
    later, escalated, newer = (replace(page_job(i), priority=p) for i, p in enumerate((20, 10, 20)))
    with session_scope(database_url) as session:
        for batch, job in (("first", later), ("retry", escalated), ("second", newer)):
            ocr_queue.enqueue(session=session, batch_id=batch, jobs=[job])
    with session_scope(database_url) as session:
        claimed = ocr_queue.claim_batch(session=session, worker_id="w", limit=1)
        claimed += ocr_queue.claim_batch(session=session, worker_id="w", limit=2)
    assert [job.spec.request_key for job in claimed] == ["page-1", "page-0", "page-2"]


def test_one_claim_returns_its_jobs_in_claim_order(database_url: str) -> None:
    """Within one claim too: the escalation (older priority, newer id) comes first, so the
    worker prepares and decodes it first."""
    jobs = [replace(page_job(i), priority=p) for i, p in enumerate((20, 30, 10, 20))]
    with session_scope(database_url) as session:
        for index, job in enumerate(jobs):
            ocr_queue.enqueue(session=session, batch_id=f"window-{index}", jobs=[job])
    with session_scope(database_url) as session:
        claimed = ocr_queue.claim_batch(session=session, worker_id="w", limit=4)
    assert [job.spec.request_key for job in claimed] == ["page-2", "page-0", "page-3", "page-1"]
    assert [job.spec.priority for job in claimed] == [10, 20, 20, 30]


def test_a_claim_returns_each_image_byte_for_byte(database_url: str) -> None:
    """Images of a few MB with every byte value (on Postgres read apart from the claim, in
    binary format) come back exactly, each with its own job."""
    images = [os.urandom(3 * 2**20 + index) for index in range(3)]
    jobs = [replace(page_job(i), image=image) for i, image in enumerate(images)]
    with session_scope(database_url) as session:
        ocr_queue.enqueue(session=session, batch_id="big", jobs=jobs)
    with session_scope(database_url) as session:
        claimed = ocr_queue.claim_batch(session=session, worker_id="w", limit=3)
    assert [job.spec.request_key for job in claimed] == ["page-0", "page-1", "page-2"]
    assert [job.spec.image for job in claimed] == images


@dataclass
class OrderEngine(SizeEchoEngine):
    """Notes which page (its image width: 100 + index) it reads, in the order it reads them."""

    served: list[int] = field(default_factory=list)

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]:
        self.served.extend(request.image.width - 100 for request in requests)
        return super().recognize(requests)


def test_a_worker_serves_pages_first_in_first_out_across_windows(postgres_url: str) -> None:
    """Two windows' pages, queued one window after the other, then an escalation of the
    first page (it keeps the priority of when its page was first queued): a worker that
    decodes one page at a time reads the escalation first, then every page in the order it was
    queued, so early windows finish first rather than all windows near the end."""
    window = [replace(page_job(i), priority=1.0 + i) for i in range(6)]
    escalation = replace(page_job(6), priority=0.5)
    with session_scope(postgres_url) as session:
        ocr_queue.enqueue(session=session, batch_id="window-0", jobs=window[:3])
        ocr_queue.enqueue(session=session, batch_id="window-1", jobs=window[3:])
        ocr_queue.enqueue(session=session, batch_id="window-0", jobs=[escalation])
    engine = OrderEngine()

    answered = make_worker(postgres_url, engine, max_batch=1).run()

    assert answered == 7
    assert engine.served == [6, 0, 1, 2, 3, 4, 5]


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


def test_a_silent_worker_is_marked_stopped_and_its_jobs_reclaimed(database_url: str) -> None:
    """Leases of 10 minutes, but the holder stopped beating: its jobs go back to the queue
    without waiting for the leases, and it no longer counts as live. A live holder and a job
    on its last attempt are treated as such."""
    enqueue_pages(database_url, 4)
    for worker_id in ("silent", "alive", "signed-off"):
        beat(database_url, worker_id)
    with session_scope(database_url) as session:
        for worker_id, limit in (("silent", 2), ("alive", 1), ("signed-off", 1)):
            ocr_queue.claim_batch(
                session=session, worker_id=worker_id, limit=limit, lease_seconds=600
            )
        # The silent worker's last beat was 30 s ago; the other stopped without answering.
        silent = session.get(OcrWorker, "silent")
        silent.last_seen_at -= timedelta(seconds=30)
        ocr_queue.sign_off(session=session, worker_id="signed-off", pages_done=0)
        session.execute(
            update(OcrJob).where(OcrJob.request_key == "page-1").values(attempts=3)
        )  # page-1 (held by the silent worker) is on its third claim

    with session_scope(database_url) as session:
        assert {w.id for w in ocr_queue.live_workers(session=session, within_seconds=20)} == {
            "alive"
        }
        assert ocr_queue.reclaim_stale(session=session, max_attempts=3, stale_after_seconds=20) == 3
        assert ocr_queue.reclaim_stale(session=session, max_attempts=3, stale_after_seconds=20) == 0

    jobs = jobs_by_key(database_url)
    assert (jobs["page-0"].status, jobs["page-0"].claimed_by) == (OcrJobStatus.PENDING, None)
    assert jobs["page-1"].status == OcrJobStatus.FAILED
    assert ocr_queue.is_lease_exhausted(jobs["page-1"].error)
    assert (jobs["page-2"].status, jobs["page-2"].claimed_by) == (OcrJobStatus.CLAIMED, "alive")
    assert (jobs["page-3"].status, jobs["page-3"].claimed_by) == (OcrJobStatus.PENDING, None)
    with session_scope(database_url) as session:
        stopped = {w.id: w.stopped_at is not None for w in session.scalars(select(OcrWorker))}
    assert stopped == {"silent": True, "alive": False, "signed-off": True}


def result_for(key: str) -> dict:
    result = OcrResult(key, f"text of {key}", [], "", FinishReason.EOS, "hand", "test")
    return result_to_dict(result)


def test_a_batch_keeps_answered_pages_when_some_jobs_fail(postgres_url: str) -> None:
    """Two pages answered, one failed by the worker's engine, one whose worker died on its
    only claim (reclaimed by the waiting CPU side itself): the answers come back with a
    per-page error for each failed job, the lost one transient."""
    policy = LeasePolicy(heartbeat_seconds=0.2, max_attempts=1)
    engine = QueueEngine(postgres_url, worker_grace_seconds=30, poll_seconds=0.05, policy=policy)
    requests = [
        OcrRequest(f"k{n}", Image.new("RGB", (30 + n, 30)), Mode.TINY, 612.0, 792.0)
        for n in range(4)
    ]
    raised: list[BaseException] = []

    def recognize() -> None:
        try:
            engine.recognize(requests)
        except BaseException as error:
            raised.append(error)

    beat(postgres_url, "hand")
    thread = threading.Thread(target=recognize)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while len(jobs_by_key(postgres_url)) < 4:
            assert time.monotonic() < deadline, "the batch was never enqueued"
            time.sleep(0.02)
        with session_scope(postgres_url) as session:
            jobs = ocr_queue.claim_batch(session=session, worker_id="hand", limit=4)
            for job in jobs[:2]:
                result = result_for(job.spec.request_key)
                ocr_queue.complete(session=session, worker_id="hand", job_id=job.id, result=result)
            ocr_queue.fail(
                session=session, worker_id="hand", job_id=jobs[2].id, error="hand failed: blurry"
            )
            # The worker dies holding k3: its lease runs out now.
            ocr_queue.extend_leases(
                session=session, worker_id="hand", job_ids=[jobs[3].id], lease_seconds=0
            )
    finally:
        thread.join(timeout=30)

    [error] = raised
    assert isinstance(error, PartialBatchError)
    assert {key: r.markdown for key, r in error.results.items()} == {
        "k0": "text of k0",
        "k1": "text of k1",
    }
    assert set(error.errors) == {"k2", "k3"}
    assert isinstance(error.errors["k2"], OcrJobFailedError)
    assert "blurry" in str(error.errors["k2"])
    assert isinstance(error.errors["k3"], OcrJobLostError)
    assert isinstance(error.errors["k3"], TransientError)
    assert jobs_by_key(postgres_url) == {}  # collected


def test_queue_engine_round_trip_through_a_worker(database_url: str) -> None:
    worker = make_worker(database_url, SizeEchoEngine(), max_batch=2, once=False)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_until_live(database_url)
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


def test_without_a_worker_a_batch_gives_up_once_and_later_batches_at_once(
    fresh_queue_url: str,
) -> None:
    policy = LeasePolicy(heartbeat_seconds=0.2)  # a worker silent for 2 s is gone
    engine = QueueEngine(
        fresh_queue_url, worker_grace_seconds=0.3, poll_seconds=0.05, policy=policy
    )
    request = OcrRequest("1", Image.new("RGB", (20, 20)), Mode.TINY, 612.0, 792.0)
    with pytest.raises(EngineUnavailable, match="no live GPU worker"):
        engine.recognize([request])
    assert jobs_by_key(fresh_queue_url) == {}  # the abandoned batch is cancelled

    started = time.monotonic()
    with pytest.raises(EngineUnavailable, match="no GPU worker has beaten since"):
        engine.recognize([request])
    assert time.monotonic() - started < 0.3  # the grace is not waited again
    assert jobs_by_key(fresh_queue_url) == {}

    # A worker that beats (and then dies) earns the next batch a full grace again.
    beat(fresh_queue_url, "short-lived")
    started = time.monotonic()
    with pytest.raises(EngineUnavailable, match="no live GPU worker"):
        engine.recognize([request])
    assert time.monotonic() - started > policy.stale_after_seconds
