"""The resident GPU worker: one process per GPU, the model loaded once, pages from the queue.

    ocrflow gpu-worker --device cuda:0                  # serve the queue until SIGTERM
    ocrflow gpu-workers --devices cuda:0,cuda:1         # one worker process per GPU

The loop claims at most as many pages as the engine decodes at once (its GPU slots, so pages
wait in the queue rather than oversubscribe the card), recognises them in one mixed-mode batch
sorted by expected output length, and answers each job. A batch that runs out of memory is
split in halves and retried, and the claim size shrinks; a page that fails alone is failed with
the reason, never dropped. A background thread refreshes the worker's heartbeat and the leases
of the pages it holds, so long pages keep their lease and a crashed worker's pages return to the
queue when their leases expire. SIGTERM finishes the batch in hand, then exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

import typer

from infra.db import ocr_queue
from infra.db.ocr_queue import ClaimedJob, WorkerInfo
from infra.db.session import session_scope
from infra.settings import EngineChoice, Settings
from models.engine import OcrEngine, OcrRequest, OcrResult
from models.queue_engine import job_to_request, result_to_dict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker uses the queue. `once`: drain the queue, then exit (tests, batch jobs)."""

    database_url: str
    max_batch: int
    lease_seconds: float = ocr_queue.DEFAULT_LEASE_SECONDS
    poll_seconds: float = 0.5
    max_attempts: int = ocr_queue.DEFAULT_MAX_ATTEMPTS
    heartbeat_seconds: float = ocr_queue.HEARTBEAT_SECONDS
    once: bool = False


@dataclass
class PageAnswer:
    """A job's outcome in the worker: a result, or the error that ended it."""

    job: ClaimedJob
    result: OcrResult | None = None
    error: str | None = None
    out_of_memory: bool = False


class _LeaseKeeper(threading.Thread):
    """Refreshes the worker's heartbeat and the leases of the jobs it holds, off the GPU loop."""

    def __init__(self, info: WorkerInfo, config: WorkerConfig) -> None:
        super().__init__(name="lease-keeper", daemon=True)
        self.info, self.config = info, config
        self.held: set[int] = set()
        self.pages_done = 0
        self.stopped = threading.Event()
        self._lock = threading.Lock()

    def hold(self, job_ids: Sequence[int]) -> None:
        with self._lock:
            self.held.update(job_ids)

    def release(self, job_ids: Sequence[int]) -> None:
        with self._lock:
            self.held.difference_update(job_ids)

    def beat(self) -> None:
        with self._lock:
            held = sorted(self.held)
        with session_scope(self.config.database_url) as session:
            ocr_queue.heartbeat(session=session, worker=self.info, pages_done=self.pages_done)
            ocr_queue.extend_leases(
                session=session,
                worker_id=self.info.worker_id,
                job_ids=held,
                lease_seconds=self.config.lease_seconds,
            )

    def run(self) -> None:
        while not self.stopped.wait(self.config.heartbeat_seconds):
            try:
                self.beat()
            except Exception:  # the database blinked: the next beat retries, leases have slack
                logger.exception("heartbeat failed")


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError)


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class GpuWorker:
    """Claims pages, recognises them with a resident engine and answers each job."""

    def __init__(self, engine: OcrEngine, info: WorkerInfo, config: WorkerConfig) -> None:
        self.engine, self.info, self.config = engine, info, config
        self.batch_limit = config.max_batch
        self.keeper = _LeaseKeeper(info, config)
        self.stop_requested = threading.Event()

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    def request_stop(self) -> None:
        """Finish the batch in hand, then leave the loop."""
        self.stop_requested.set()

    def run(self) -> int:
        """Serve the queue until stopped (or, with `once`, until it is empty); pages answered."""
        self.keeper.beat()
        self.keeper.start()
        try:
            while not self.stop_requested.is_set():
                jobs = self._claim()
                if jobs:
                    self._process(jobs)
                elif self.config.once:
                    break
                else:
                    self.stop_requested.wait(self.config.poll_seconds)
        finally:
            self.keeper.stopped.set()
            with session_scope(self.config.database_url) as session:
                ocr_queue.sign_off(
                    session=session, worker_id=self.worker_id, pages_done=self.keeper.pages_done
                )
        return self.keeper.pages_done

    def _claim(self) -> list[ClaimedJob]:
        with session_scope(self.config.database_url) as session:
            ocr_queue.reclaim_stale(session=session, max_attempts=self.config.max_attempts)
            jobs = ocr_queue.claim_batch(
                session=session,
                worker_id=self.worker_id,
                limit=self.batch_limit,
                lease_seconds=self.config.lease_seconds,
            )
        self.keeper.hold([job.id for job in jobs])
        return jobs

    def _process(self, jobs: list[ClaimedJob]) -> None:
        # Similar expected lengths side by side: sequences of a batch finish close together.
        jobs = sorted(jobs, key=lambda job: job.spec.estimated_text_tokens or 0)
        started = time.perf_counter()
        answers = self._recognize(jobs, [job_to_request(job) for job in jobs])
        self._answer(answers)
        self._grow_batch_limit(len(jobs))
        logger.info(
            "%s: %d pages in %.1f s (claim limit %d)",
            self.worker_id,
            len(jobs),
            time.perf_counter() - started,
            self.batch_limit,
        )

    def _recognize(self, jobs: list[ClaimedJob], requests: list[OcrRequest]) -> list[PageAnswer]:
        """Recognise a batch; on an error, halve it until the failing page stands alone."""
        try:
            results = self.engine.recognize(requests)
        except Exception as error:
            out_of_memory = is_out_of_memory(error)
            if out_of_memory:
                _free_device_memory()
                self.batch_limit = max(1, min(self.batch_limit, len(jobs) // 2))
            if len(jobs) == 1:
                logger.exception("%s: page job %d failed", self.worker_id, jobs[0].id)
                reason = f"{self.engine.name} failed: {type(error).__name__}: {error}"
                return [PageAnswer(jobs[0], error=reason, out_of_memory=out_of_memory)]
            half = len(jobs) // 2
            return self._recognize(jobs[:half], requests[:half]) + self._recognize(
                jobs[half:], requests[half:]
            )
        return [PageAnswer(job, result) for job, result in zip(jobs, results, strict=True)]

    def _answer(self, answers: list[PageAnswer]) -> None:
        accepted = 0
        with session_scope(self.config.database_url) as session:
            for answer in answers:
                if answer.result is not None:
                    accepted += ocr_queue.complete(
                        session=session,
                        worker_id=self.worker_id,
                        job_id=answer.job.id,
                        result=result_to_dict(answer.result),
                    )
                else:
                    # Out of memory alone may pass on a card with more room: let another try.
                    ocr_queue.fail(
                        session=session,
                        worker_id=self.worker_id,
                        job_id=answer.job.id,
                        error=answer.error or "unknown error",
                        retry=answer.out_of_memory,
                        max_attempts=self.config.max_attempts,
                    )
        self.keeper.release([answer.job.id for answer in answers])
        self.keeper.pages_done += accepted  # answers to leases lost to another worker: dropped

    def _grow_batch_limit(self, batch_size: int) -> None:
        """After an out-of-memory split, win the claim size back slowly on full batches."""
        if batch_size >= self.batch_limit < self.config.max_batch:
            self.batch_limit = min(self.config.max_batch, self.batch_limit + 1 + batch_size // 8)


@dataclass
class _StopOnSignals:
    """SIGTERM/SIGINT: finish the batch in hand; a second signal stops at once (leases expire,
    and the pages go to another worker)."""

    worker: GpuWorker
    received: list[int] = field(default_factory=list)

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        self.received.append(signum)
        if len(self.received) > 1:
            raise KeyboardInterrupt
        logger.info("signal %d: finishing the current batch, then exiting", signum)
        self.worker.request_stop()


def build_worker_engine(settings: Settings) -> OcrEngine:
    """The resident engine: the setting's engine, never the queue itself."""
    from models.registry import build_engine

    if settings.engine is EngineChoice.QUEUE:
        raise typer.BadParameter("a GPU worker needs a real engine, not 'queue' (use --engine)")
    return build_engine(settings)


def engine_slots(engine: OcrEngine, requested: int | None, settings: Settings) -> int:
    """Pages the worker decodes at once: as requested, else what the device's free memory
    holds for the DeepSeek engine, else the setting's batch size. The engine is told too."""
    from models.deepseek_ocr.engine import DeepseekOcrEngine

    if not isinstance(engine, DeepseekOcrEngine):
        return requested or settings.ocr_batch_size
    from dataclasses import replace

    from models.deepseek_ocr.serving import slots_for_free_memory

    slots = requested or slots_for_free_memory(engine.model, engine.settings.max_new_tokens)
    engine.settings = replace(engine.settings, max_batch=slots)
    return slots


def run_worker(settings: Settings, *, device: str, max_batch: int | None, once: bool) -> int:
    """Load the engine on `device` and serve the queue; returns the pages answered."""
    from infra.db.migrate import ensure_schema

    ensure_schema(settings.database_url)
    settings = settings.model_copy(update={"device": device})
    engine = build_worker_engine(settings)
    slots = engine_slots(engine, max_batch, settings)
    info = WorkerInfo(
        device=device, engine=engine.name, model_revision=engine.model_revision, capacity=slots
    )
    config = WorkerConfig(database_url=settings.database_url, max_batch=slots, once=once)
    worker = GpuWorker(engine, info, config)
    _StopOnSignals(worker).install()
    logger.info("%s: %s (%s) ready, %d slots", info.worker_id, engine.name, device, slots)
    return worker.run()


def gpu_worker_command(
    device: Annotated[str, typer.Option(help="Device of this worker: cuda:N, or cpu.")] = "cuda:0",
    engine: Annotated[
        EngineChoice | None, typer.Option(help="Engine to keep resident (default: setting).")
    ] = None,
    max_batch: Annotated[
        int | None,
        typer.Option(help="Pages decoded at once (default: as many as free memory holds)."),
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="Drain the queue, then exit.")] = False,
) -> None:
    """Serve the GPU work queue with a resident model on one device."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = Settings(**({"engine": engine} if engine else {}))
    done = run_worker(settings, device=device, max_batch=max_batch, once=once)
    typer.echo(f"{done} pages answered")


def gpu_workers_command(
    devices: Annotated[str, typer.Option(help="Comma-separated devices, one worker each.")],
    engine: Annotated[EngineChoice | None, typer.Option(help="Engine to keep resident.")] = None,
    max_batch: Annotated[int | None, typer.Option(help="Pages decoded at once per GPU.")] = None,
    once: Annotated[bool, typer.Option("--once", help="Drain the queue, then exit.")] = False,
) -> None:
    """One `gpu-worker` process per device on this host; SIGTERM is passed on to each."""
    processes = spawn_workers(
        [d.strip() for d in devices.split(",") if d.strip()],
        engine=engine,
        max_batch=max_batch,
        once=once,
    )
    forward = lambda signum, _frame: [p.send_signal(signum) for p in processes]  # noqa: E731
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [process.wait() for process in processes]
    if any(codes):
        raise typer.Exit(max(codes))


def spawn_workers(
    devices: Sequence[str],
    *,
    engine: EngineChoice | None = None,
    max_batch: int | None = None,
    once: bool = False,
) -> list[subprocess.Popen]:
    """Start one worker process per device (separate processes: one CUDA context and one
    resident model each, no GIL shared between GPUs)."""
    processes = []
    for device in devices:
        command = [sys.executable, "-m", "flows.cli", "gpu-worker", "--device", device]
        command += ["--engine", engine.value] if engine else []
        command += ["--max-batch", str(max_batch)] if max_batch else []
        command += ["--once"] if once else []
        processes.append(subprocess.Popen(command, env=os.environ.copy()))
    return processes


__all__ = [
    "GpuWorker",
    "PageAnswer",
    "WorkerConfig",
    "build_worker_engine",
    "engine_slots",
    "gpu_worker_command",
    "gpu_workers_command",
    "is_out_of_memory",
    "run_worker",
    "spawn_workers",
]
