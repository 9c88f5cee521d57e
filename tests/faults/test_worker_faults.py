"""GPU worker faults against the real Postgres queue: a worker SIGKILLed while it holds pages,
no worker at all, a page the engine fails, and out of memory on large batches. In each, no
page is lost and none is answered twice; the figures go to the fault suite's record."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from sqlalchemy import select

from infra.db import ocr_queue
from infra.db.models import OcrJob, OcrJobStatus, OcrWorker
from infra.db.ocr_queue import JobSpec, LeasePolicy, WorkerInfo
from infra.db.session import session_scope
from infra.errors import EngineUnavailable
from infra.vocabulary import Mode
from models.engine import (
    FinishReason,
    OcrRequest,
    OcrResult,
    PartialBatchError,
    recognize_isolating_failures,
)
from models.queue_engine import IMAGE_FORMAT, OcrJobFailedError, QueueEngine, encode_image
from models.streaming import BatchedStream
from services.gpu_worker import GpuWorker, WorkerConfig
from tests.conftest import REPO_ROOT, url_new_to_this_process

LEASE_SECONDS = 45  # long, so a reclaim well before it is the heartbeat's doing
HEARTBEAT_SECONDS = 2


@pytest.fixture
def fresh_queue_url(postgres_url: str, request: pytest.FixtureRequest) -> str:
    return url_new_to_this_process(postgres_url, request)


def text_page(index: int) -> Image.Image:
    """A page RapidOCR spends about half a second on."""
    image = Image.new("RGB", (600, 300), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=22)
    for line in range(5):
        draw.text((20, 20 + 50 * line), f"page {index} line {line} lorem ipsum", "black", font)
    return image


def job_rows(url: str) -> list[OcrJob]:
    with session_scope(url) as session:
        return list(session.scalars(select(OcrJob).order_by(OcrJob.id)))


def worker_rows(url: str) -> dict[str, OcrWorker]:
    with session_scope(url) as session:
        return {row.id: row for row in session.scalars(select(OcrWorker))}


@dataclass
class WorkerProcess:
    """`ocrflow gpu-worker` on the CPU engine, its output in a log file."""

    url: str
    log: Path
    process: subprocess.Popen = field(init=False)

    def __post_init__(self) -> None:
        env = os.environ | {
            "OCRFLOW_DATABASE_URL": self.url,
            "OCRFLOW_QUEUE_LEASE_SECONDS": str(LEASE_SECONDS),
            "OCRFLOW_QUEUE_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
            "OMP_NUM_THREADS": "1",
        }
        command = [sys.executable, "-m", "flows.cli", "gpu-worker", "--device", "cpu"]
        command += ["--engine", "rapidocr", "--max-batch", "2"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def worker_id(self) -> str | None:
        """Its row's id (host:pid:device) once it has beaten."""
        mine = [w for w in worker_rows(self.url) if f":{self.process.pid}:" in w]
        return mine[0] if mine else None

    def alive(self) -> bool:
        assert self.process.poll() is None, f"worker exited:\n{self.log.read_text()[-3000:]}"
        return True


@pytest.fixture
def worker_processes(postgres_url: str, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


def wait_for(condition, what: str, timeout: float, poll: float = 0.1) -> float:
    """Seconds until `condition()` held."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        time.sleep(poll)
    return time.monotonic() - started


def test_sigkilled_worker_pages_are_reclaimed_and_each_answered_once(
    postgres_url: str, worker_processes: list[WorkerProcess], tmp_path: Path, fault_record
) -> None:
    pages = 10
    jobs = [
        JobSpec(f"p{i}", encode_image(text_page(i)), IMAGE_FORMAT, 600.0, 300.0)
        for i in range(pages)
    ]
    with session_scope(postgres_url) as session:
        ocr_queue.enqueue(session=session, batch_id="sigkill", jobs=jobs)
    first = WorkerProcess(postgres_url, tmp_path / "first.log")
    worker_processes.append(first)

    def first_is_working() -> bool:
        rows = job_rows(postgres_url)
        done = any(row.status == OcrJobStatus.DONE for row in rows)
        return first.alive() and done and any(row.status == OcrJobStatus.CLAIMED for row in rows)

    wait_for(first_is_working, "the first worker answered a page", timeout=40, poll=0.05)
    dead_id = first.worker_id
    first.process.send_signal(signal.SIGKILL)  # no clean-up, no sign-off
    killed_at = time.monotonic()
    first.process.wait()
    held = {row.id for row in job_rows(postgres_url) if row.status == OcrJobStatus.CLAIMED}
    assert held and {row.claimed_by for row in job_rows(postgres_url) if row.id in held} == {
        dead_id
    }

    second = WorkerProcess(postgres_url, tmp_path / "second.log")
    worker_processes.append(second)

    def reclaimed() -> bool:
        second.alive()
        rows = job_rows(postgres_url)
        return not any(
            row.status == OcrJobStatus.CLAIMED and row.claimed_by == dead_id for row in rows
        )

    wait_for(reclaimed, "the killed worker's pages were reclaimed", timeout=60)
    reclaim_seconds = time.monotonic() - killed_at

    def all_answered() -> bool:
        second.alive()
        return all(row.status in OcrJobStatus.TERMINAL for row in job_rows(postgres_url))

    wait_for(all_answered, "every page answered", timeout=60)
    second.process.send_signal(signal.SIGTERM)
    assert second.process.wait(timeout=30) == 0

    rows = job_rows(postgres_url)
    workers = worker_rows(postgres_url)
    second_id = second.worker_id
    lost = [row.request_key for row in rows if row.status != OcrJobStatus.DONE]
    by_second = [row for row in rows if row.claimed_by == second_id]
    duplicates = workers[second_id].pages_done - len(by_second)  # accepted answers beyond rows
    fault_record(
        "gpu-worker-sigkill",
        fault="SIGKILL of a GPU worker holding leases; a second worker started",
        injected=1,
        pages_checked=len(rows),
        pages_lost=len(lost),
        duplicates=duplicates,
        reclaim_seconds=round(reclaim_seconds, 2),
        pages_held_when_killed=len(held),
        lease_seconds=LEASE_SECONDS,
        heartbeat_seconds=HEARTBEAT_SECONDS,
    )
    assert len(rows) == pages and lost == [] and duplicates == 0
    assert {row.claimed_by for row in rows} == {dead_id, second_id}
    for row in rows:  # a real answer each; the held pages by the second worker, on a 2nd claim
        assert row.result["engine"] == "rapidocr" and "lorem" in row.result["markdown"]
        assert row.attempts == (2 if row.id in held else 1)
    assert {row.claimed_by for row in rows if row.id in held} == {second_id}
    assert workers[dead_id].stopped_at is not None  # marked stopped by a survivor
    assert workers[second_id].stopped_at is not None  # signed off
    # The heartbeat noticed the death, well before the leases would have run out.
    assert reclaim_seconds < min(LEASE_SECONDS - 15, 60)


def queued_requests(count: int, prefix: str) -> list[OcrRequest]:
    return [
        OcrRequest(f"{prefix}{n}", Image.new("RGB", (40 + n, 40)), Mode.TINY, 612.0, 792.0)
        for n in range(count)
    ]


def test_without_a_worker_a_batch_waits_one_grace_and_the_next_none(
    fresh_queue_url: str, fault_record
) -> None:
    """The pipeline's view: every page of the batch is reported unavailable at once (not
    halved into batches that each wait the grace again), and the next batch fails at once."""
    grace = 2.0
    engine = QueueEngine(fresh_queue_url, worker_grace_seconds=grace, poll_seconds=0.05)
    timings, outcomes = [], {}

    def finished(request: OcrRequest, outcome: OcrResult | Exception) -> None:
        assert request.key not in outcomes, "a page reported twice"
        outcomes[request.key] = outcome

    for batch in ("a", "b"):
        started = time.monotonic()
        recognize_isolating_failures(engine, queued_requests(4, batch), finished)
        timings.append(time.monotonic() - started)
    fault_record(
        "queue-no-worker",
        fault="OCRFLOW_ENGINE=queue with no GPU worker; two 4-page batches",
        injected=2,
        pages_checked=8,
        pages_lost=8 - len(outcomes),
        duplicates=0,
        grace_seconds=grace,
        first_batch_seconds=round(timings[0], 2),
        second_batch_seconds=round(timings[1], 2),
    )
    assert len(outcomes) == 8
    assert all(isinstance(outcome, EngineUnavailable) for outcome in outcomes.values())
    assert grace <= timings[0] < 2 * grace  # one grace in all, not one per halved batch
    assert timings[1] < 0.5  # the verdict is remembered
    assert job_rows(fresh_queue_url) == []  # both batches cancelled


@dataclass
class FailsOnePage:
    """A scripted engine that echoes each page's width but cannot read one of them."""

    bad_width: int
    name: str = "fails-one"
    model_revision: str = "test"

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]:
        if any(request.image.width == self.bad_width for request in requests):
            raise ValueError(f"cannot read a page {self.bad_width} px wide")
        return [
            OcrResult(r.key, f"width {r.image.width}", [], "", FinishReason.EOS, self.name, "t")
            for r in requests
        ]


def test_a_page_the_worker_fails_leaves_the_other_pages_answered(
    postgres_url: str, fault_record
) -> None:
    info = WorkerInfo(device="cpu", engine="fails-one", model_revision="test", capacity=4)
    config = WorkerConfig(
        database_url=postgres_url,
        max_batch=4,
        policy=LeasePolicy(heartbeat_seconds=0.2),
        poll_seconds=0.05,
    )
    worker = GpuWorker(FailsOnePage(bad_width=42), info, config)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        engine = QueueEngine(postgres_url, worker_grace_seconds=30, poll_seconds=0.05)
        with pytest.raises(PartialBatchError) as raised:
            engine.recognize(queued_requests(4, "p"))  # p2 is 42 px wide
    finally:
        worker.request_stop()
        thread.join(timeout=30)
    partial = raised.value
    fault_record(
        "gpu-worker-page-error",
        fault="the worker's engine fails one page of a 4-page batch",
        injected=1,
        pages_checked=4,
        pages_lost=4 - len(partial.results) - len(partial.errors),
        duplicates=0,
    )
    assert {key: r.markdown for key, r in partial.results.items()} == {
        "p0": "width 40",
        "p1": "width 41",
        "p3": "width 43",
    }
    assert list(partial.errors) == ["p2"]
    assert isinstance(partial.errors["p2"], OcrJobFailedError)
    assert "cannot read a page 42 px wide" in str(partial.errors["p2"])


@dataclass
class OutOfMemoryOnce:
    """Runs out of memory on the first batch larger than `fits`, then has room again."""

    fits: int
    name: str = "oom-once"
    model_revision: str = "test"
    batches: list[int] = field(default_factory=list)

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]:
        self.batches.append(len(requests))
        if len(requests) > self.fits and self.fits:
            self.fits = 0  # the pressure passes after this
            raise torch.OutOfMemoryError("CUDA out of memory (scripted)")
        return [
            OcrResult(r.key, r.key, [], "", FinishReason.EOS, self.name, "test") for r in requests
        ]


class ListOfRequests:
    def __init__(self, requests: list[OcrRequest]) -> None:
        self.waiting = list(requests)

    def take(self, limit: int, *, wait: bool) -> list[OcrRequest] | None:
        if not self.waiting:
            return None
        taken, self.waiting = self.waiting[:limit], self.waiting[limit:]
        return taken


def test_out_of_memory_shrinks_the_batch_then_wins_it_back(fault_record) -> None:
    engine = OutOfMemoryOnce(fits=4)
    stream = BatchedStream(engine, max_batch=8)
    answered: dict[str, list[OcrResult | Exception]] = {}
    requests = queued_requests(60, "p")
    stream.serve(
        ListOfRequests(requests), lambda r, outcome: answered.setdefault(r.key, []).append(outcome)
    )
    fault_record(
        "gpu-worker-oom",
        fault="out of memory on the first batch of 8 (BatchedStream)",
        injected=1,
        pages_checked=len(requests),
        pages_lost=len(requests) - len(answered),
        duplicates=sum(len(outcomes) - 1 for outcomes in answered.values()),
        batches=engine.batches,
    )
    assert {key: [r.markdown for r in outcomes] for key, outcomes in answered.items()} == {
        r.key: [r.key] for r in requests
    }
    assert engine.batches[:3] == [8, 4, 4]  # halved until it fits
    assert engine.batches[3:8] == [5, 6, 7, 8, 8]  # then won back a step per batch
    assert stream.batch_limit.limit == 8
