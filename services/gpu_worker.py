"""The resident GPU worker: one process per GPU, the model loaded once, pages from the queue.

    ocrflow gpu-worker --device cuda:0                  # serve the queue until SIGTERM
    ocrflow gpu-workers --devices cuda:0,cuda:1         # one worker process per GPU
    (commands in flows/service_commands.py)

The main thread runs the engine's decode loop (`StreamingEngine.serve`) for the worker's whole
life. A feeder thread (`job_feeder`) claims jobs ahead of it, at most the engine's slots plus a
small prefetch (so pages wait in the queue rather than oversubscribe the card), prepares them
off the decode loop, and answers each job the moment its page finishes; the engine refills the
freed slot from the feed between decode steps, so the batch stays full across claims. Engines
that only `recognize` run a batch of ready pages at a time (`streaming.BatchedStream`). Errors
are contained per page (out of memory shrinks the batch and retries; a page that fails alone is
failed with the reason, never dropped). A heartbeat thread refreshes the worker's row and the
leases of the pages it holds; when it stops (the process was killed), the other workers' feeders
and the waiting CPU sides notice the stale heartbeat within a few beats and return its pages to
the queue (`ocr_queue.reclaim_stale`). SIGTERM stops claiming, finishes and answers the pages
held, then exits.
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
from typing import Any

import typer

from infra.db import ocr_queue
from infra.db.ocr_queue import DEFAULT_POLICY, LeasePolicy, WorkerInfo
from infra.db.session import session_scope
from infra.settings import EngineChoice, Settings
from models.engine import OcrEngine
from models.streaming import BatchedStream, StreamingEngine
from services.job_feeder import JobFeeder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker uses the queue. `once`: drain the queue, then exit (tests, batch jobs).

    `prefetch` jobs are claimed beyond the `max_batch` the engine decodes at once (default an
    eighth of it, at least one), so a slot that frees finds a prepared page waiting. `policy`:
    lease length, heartbeat interval and claims per page (the `OCRFLOW_QUEUE_*` settings).
    """

    database_url: str
    max_batch: int
    policy: LeasePolicy = DEFAULT_POLICY
    poll_seconds: float = 0.5
    once: bool = False
    prefetch: int | None = None

    @property
    def in_flight_limit(self) -> int:
        """Jobs held at once: claimed and not yet answered."""
        prefetch = max(1, self.max_batch // 8) if self.prefetch is None else self.prefetch
        return self.max_batch + prefetch


class LeaseKeeper(threading.Thread):
    """Refreshes the worker's heartbeat and the leases of the jobs it holds, off the GPU loop."""

    def __init__(self, info: WorkerInfo, config: WorkerConfig) -> None:
        super().__init__(name="lease-keeper", daemon=True)
        self.info, self.config = info, config
        self.held: set[int] = set()
        self.pages_done = 0
        self.stopped = threading.Event()
        self._lock = threading.Lock()

    def hold(self, job_ids: list[int]) -> None:
        with self._lock:
            self.held.update(job_ids)

    def release(self, job_ids: list[int]) -> None:
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
                lease_seconds=self.config.policy.lease_seconds,
            )

    def run(self) -> None:
        while not self.stopped.wait(self.config.policy.heartbeat_seconds):
            try:
                self.beat()
            except Exception:  # the database blinked: the next beat retries, leases have slack
                logger.exception("heartbeat failed")


class GpuWorker:
    """Serves the queue with a resident engine: a decode loop fed by a `JobFeeder`."""

    def __init__(
        self,
        engine: StreamingEngine[Any, Any] | OcrEngine,
        info: WorkerInfo,
        config: WorkerConfig,
    ) -> None:
        self.stream: StreamingEngine[Any, Any] = (
            engine
            if isinstance(engine, StreamingEngine)
            else BatchedStream(engine, config.max_batch)
        )
        self.info, self.config = info, config
        self.keeper = LeaseKeeper(info, config)
        self.feeder = JobFeeder(self.stream, info.worker_id, config, self.keeper)

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    def request_stop(self) -> None:
        """Stop claiming, finish and answer the pages held, then leave (signal-handler safe)."""
        self.feeder.close()

    def run(self) -> int:
        """Serve the queue until stopped (or, with `once`, until it is empty); pages answered."""
        if self.info.device.startswith("cuda"):
            import torch

            # The model runs on the GPU; this process's CPU work is preparing pages, spread
            # over the feeder's threads. torch's own pool (a thread per core) would only take
            # cores from the CPU workers rendering pages beside it.
            torch.set_num_threads(1)
        self.keeper.beat()
        self.keeper.start()
        self.feeder.start()
        try:
            self.stream.serve(self.feeder, self.feeder.on_finished)
        finally:
            self.feeder.serving_ended()
            self.feeder.join()
            self.keeper.stopped.set()
            with session_scope(self.config.database_url) as session:
                ocr_queue.sign_off(
                    session=session, worker_id=self.worker_id, pages_done=self.keeper.pages_done
                )
        if self.feeder.error is not None:
            raise RuntimeError(f"{self.worker_id}: the job feeder failed") from self.feeder.error
        return self.keeper.pages_done


@dataclass
class _StopOnSignals:
    """SIGTERM/SIGINT: stop claiming and finish the pages held; a second signal stops at once
    (leases expire, and the pages go to another worker)."""

    worker: GpuWorker
    received: list[int] = field(default_factory=list)

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        self.received.append(signum)
        if len(self.received) > 1:
            raise KeyboardInterrupt
        logger.info("signal %d: finishing the pages held, then exiting", signum)
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


def warm_up(engine: OcrEngine, settings: Settings) -> int:
    """Before the worker takes pages: the DeepSeek engine's vision encoder meets every view
    shape once (`DeepseekOcrEngine.warm_up_encoder`), then its decode graphs are captured for up
    to `graph_warm_up_seconds` (`Generator.capture_graphs`); other engines have neither. The
    decode graphs captured."""
    from models.deepseek_ocr.engine import DeepseekOcrEngine

    if not isinstance(engine, DeepseekOcrEngine) or settings.graph_warm_up_seconds <= 0:
        return 0
    started = time.monotonic()
    shapes = engine.warm_up_encoder()
    logger.info("encoded %d view shapes in %.1f s", shapes, time.monotonic() - started)
    started = time.monotonic()
    graphs = engine.capture_graphs(settings.graph_warm_up_seconds)
    logger.info("captured %d decode graphs in %.1f s", graphs, time.monotonic() - started)
    return graphs


def run_worker(settings: Settings, *, device: str, max_batch: int | None, once: bool) -> int:
    """Load the engine on `device` and serve the queue; returns the pages answered."""
    from infra.db.migrate import ensure_schema

    ensure_schema(settings.database_url)
    settings = settings.model_copy(update={"device": device})
    engine = build_worker_engine(settings)
    slots = engine_slots(engine, max_batch, settings)
    warm_up(engine, settings)
    info = WorkerInfo(
        device=device, engine=engine.name, model_revision=engine.model_revision, capacity=slots
    )
    policy = LeasePolicy.from_settings(settings)
    config = WorkerConfig(
        database_url=settings.database_url, max_batch=slots, policy=policy, once=once
    )
    worker = GpuWorker(engine, info, config)
    _StopOnSignals(worker).install()
    logger.info(
        "%s: %s (%s) ready, %d slots; lease %.0f s, heartbeat %.0f s",
        info.worker_id,
        engine.name,
        device,
        slots,
        policy.lease_seconds,
        policy.heartbeat_seconds,
    )
    return worker.run()


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
    "LeaseKeeper",
    "WorkerConfig",
    "build_worker_engine",
    "engine_slots",
    "run_worker",
    "spawn_workers",
]
