"""A window's CPU work spread over processes: PyMuPDF holds the GIL, so threads cannot share
routing and rendering across cores (two threads ran 8 pages no faster than one).

One process pool per process, started on first use with `spawn` (flows run threads, and
forking a threaded process is unsafe) and sized by `OCRFLOW_CPU_WORKERS`. Work goes out in
contiguous chunks of page numbers, one per worker; each worker opens the document itself.

A worker ends itself when the process that started it is gone: a pool worker blocks on its
task pipe for ever once its parent is killed (SIGKILL, an OOM kill, a benchmark's deadline), and
each such orphan kept its memory (about 0.5-1 GB with the orientation detector loaded) and
would add up over killed and resumed runs.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

from infra.memory import release_large_buffers
from infra.settings import EngineChoice, Settings, parse_core_list

ResultT = TypeVar("ResultT")

_pool: ProcessPoolExecutor | None = None
_pool_shape: tuple[int, int, str | None] = (0, 0, None)  # (processes, niceness, cores)
_lock = threading.Lock()
PARENT_CHECK_SECONDS = 1.0  # how often a worker looks whether its parent is still there
QUEUE_DOCUMENTS = 8
QUEUE_WINDOWS = 8
"""Documents, and windows per document, in flight when GPU workers do the OCR: a window ends
with its slowest page, so a GPU worker's hundreds of slots need many windows open at once to
stay full (`bench/e2e_gpu.py`); the pages rendered ahead stay bounded by `queue_pages_ahead`."""


def cpu_workers(settings: Settings) -> int:
    """Processes for CPU work: the setting, else one per core they may run on when a GPU worker
    does the OCR (the CPU side must keep it fed; `cpu_worker_cores`, else this process's
    cores), else one (the in-process engine is the bottleneck)."""
    if settings.cpu_workers is not None:
        return max(1, settings.cpu_workers)
    if settings.engine is not EngineChoice.QUEUE:
        return 1
    try:
        return len(usable_cores(settings.cpu_worker_cores))
    except AttributeError:  # no affinity outside Linux
        return os.cpu_count() or 1


def usable_cores(cores: str | None) -> set[int]:
    """The CPUs of `cores` (a `taskset` list) this process may run on; every one it may run on
    when `cores` is None or names none of those."""
    allowed = os.sched_getaffinity(0)
    return (parse_core_list(cores) & allowed if cores else None) or allowed


def document_concurrency(settings: Settings) -> int:
    """Documents one ingest run works at once: the setting, else `QUEUE_DOCUMENTS` with GPU
    workers, else one (an in-process engine has one batch in hand at a time)."""
    if settings.document_concurrency is not None:
        return max(1, settings.document_concurrency)
    return QUEUE_DOCUMENTS if settings.engine is EngineChoice.QUEUE else 1


def windows_in_flight(settings: Settings) -> int:
    """Windows of one document worked at once: the setting, else `QUEUE_WINDOWS` with GPU
    workers, else two (one recognised while the next is routed)."""
    if settings.windows_in_flight is not None:
        return max(1, settings.windows_in_flight)
    return QUEUE_WINDOWS if settings.engine is EngineChoice.QUEUE else 2


def start_worker(parent: int, niceness: int, cores: str | None = None) -> None:
    """Pool initializer: a lower priority (`niceness` added), kept to `cores` (those of them
    this process may use; all when none is), page images mapped and unmapped
    (`release_large_buffers`), and a daemon thread that ends this worker once `parent` is gone
    (the worker is then re-parented, so its parent id changes). Polled rather than
    PR_SET_PDEATHSIG, which fires when the *thread* that spawned the worker ends, and flows
    spawn from short-lived threads.

    The niceness matters where a GPU worker shares the host: its decode loop waits on the GPU
    every step and must get a core back at once, and on the H200 it decoded ~20% fewer pages/s
    while these workers kept the host's cores busy than after they were done. A priority still
    shares a core's caches and its hyperthread sibling, which `cores` leaves to the loop.
    """
    os.nice(niceness)
    if cores:
        os.sched_setaffinity(0, usable_cores(cores))
    release_large_buffers()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _shared_pool(settings: Settings) -> ProcessPoolExecutor:
    global _pool, _pool_shape
    shape = (cpu_workers(settings), settings.cpu_worker_niceness, settings.cpu_worker_cores)
    with _lock:
        if _pool is None or _pool_shape != shape:
            if _pool is not None:
                _pool.shutdown(wait=False, cancel_futures=True)
            _pool = ProcessPoolExecutor(
                shape[0],
                mp_context=multiprocessing.get_context("spawn"),
                initializer=start_worker,
                initargs=(os.getpid(), shape[1], shape[2]),
            )
            _pool_shape = shape
        return _pool


@atexit.register
def _shutdown() -> None:
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)


def in_pool(settings: Settings) -> bool:
    """Whether page work runs in the process pool: with more than one worker configured (with
    one, it runs in the calling process)."""
    return cpu_workers(settings) > 1


def submit_page_chunk(
    work: Callable[[Path, Settings, list[int]], ResultT],
    path: Path,
    settings: Settings,
    page_numbers: list[int],
) -> Future[ResultT]:
    """`work(path, settings, page_numbers)` in the pool, or done here when one worker is
    configured (the future is then already settled)."""
    if in_pool(settings):
        return _shared_pool(settings).submit(work, path, settings, page_numbers)
    future: Future[ResultT] = Future()
    try:
        future.set_result(work(path, settings, page_numbers))
    except Exception as error:
        future.set_exception(error)
    return future


def warm_up(prime: Callable[[Settings], None], settings: Settings) -> None:
    """Starts every worker process now and runs `prime` in each (imports, models), without
    waiting: spawning and importing take seconds the first pages would otherwise wait for."""
    if in_pool(settings):
        pool = _shared_pool(settings)
        for _ in range(cpu_workers(settings)):
            pool.submit(prime, settings)


def map_page_chunks(
    work: Callable[[Path, Settings, list[int]], list[ResultT]],
    path: Path,
    settings: Settings,
    page_numbers: Sequence[int],
) -> list[ResultT]:
    """`work(path, settings, chunk)` over contiguous chunks of `page_numbers` in the pool, its
    results concatenated in page order; in this process when one worker is configured."""
    workers = min(cpu_workers(settings), len(page_numbers))
    if workers <= 1:
        return work(path, settings, list(page_numbers))
    size, extra = divmod(len(page_numbers), workers)
    chunks, start = [], 0
    for index in range(workers):
        end = start + size + (index < extra)
        chunks.append(list(page_numbers[start:end]))
        start = end
    pool = _shared_pool(settings)
    futures = [pool.submit(work, path, settings, chunk) for chunk in chunks]
    return [result for future in futures for result in future.result()]
