"""The engine-alone phase of `bench.e2e_gpu`: the OCR attempts the pipeline made, made again by
the engine in this process, with no Prefect and no Postgres in the way.

The attempts are read back from our tables in the order they were stored, their pages rendered
by the pipeline's own code at its DPI (so the pixels, and with them the drawn lengths, are the
same; `served_match` checks them against what the worker served) and encoded as the queue does.
A pool of threads decodes and prepares them ahead of the decode loop (`ReplayFeed`), at most as
many at once as the worker holds, and the engine's own streaming `serve` decodes them with the
worker's slot count. Before the clock starts: preparing the first `ahead` pages, and capturing
the decode graphs as the worker captured its own before the pipeline started.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import select

from bench.e2e_engine import (
    ForcedLengthEngine,
    LengthModel,
    build_random_engine,
    gpu_memory,
    image_digest,
)
from infra.db.models import ERROR_FINISH, Document, Page, PageResult
from infra.db.session import session_scope
from infra.settings import Settings
from infra.vocabulary import Mode
from models.engine import OcrRequest
from models.queue_engine import encode_image
from services.gpu_worker import warm_up
from tasks.split import open_document

MIN_SLOT_FILLS = 3  # the engine-alone run decodes at least this many times its slots in pages


@dataclass(frozen=True)
class Attempt:
    """One OCR attempt the pipeline made, to be made again by the engine alone."""

    path: str
    page_no: int
    mode: str
    estimated_tokens: int | None
    width: float
    height: float


def ocr_attempts(database_url: str, corpus: Path) -> list[Attempt]:
    """The pipeline's answered OCR attempts in the order they were stored."""
    query = (
        select(
            Document.source_uri,
            Page.page_no,
            PageResult.mode,
            Page.est_text_tokens,
            Page.width,
            Page.height,
        )
        .join(Page, PageResult.page_id == Page.id)
        .join(Document, Page.document_id == Document.id)
        .where(PageResult.route == "ocr", PageResult.finish_reason != ERROR_FINISH)
        .order_by(PageResult.id)
    )
    with session_scope(database_url) as session:
        rows = session.execute(query).all()
    return [
        Attempt(str(corpus / Path(uri).name), page_no, mode, est, width, height)
        for uri, page_no, mode, est, width, height in rows
    ]


def render_pages(task: tuple[str, list[int], int]) -> list[tuple[bytes, str]]:
    """PNG bytes (the queue's wire format) and pixel digest of pages of one document, rendered
    by the pipeline's own code at its DPI (runs in a spawned process)."""
    path, page_numbers, dpi = task
    wanted = set(page_numbers)
    rendered: dict[int, tuple[bytes, str]] = {}
    with open_document(Path(path), Settings()) as document:
        for page in document.iter_pages(start=min(wanted), end=max(wanted)):
            if page.page_no in wanted:
                image = page.render(dpi)
                rendered[page.page_no] = (encode_image(image), image_digest(image))
    return [rendered[number] for number in page_numbers]


def render_attempts(attempts: list[Attempt], dpi: int, workers: int) -> list[tuple[bytes, str]]:
    """Every attempt's page rendered once (an escalated page is rendered once per attempt by
    the pipeline too, to the same pixels); in attempt order."""
    by_document: dict[str, list[int]] = {}
    for attempt in attempts:
        pages = by_document.setdefault(attempt.path, [])
        if attempt.page_no not in pages:
            pages.append(attempt.page_no)
    tasks = [
        (path, sorted(numbers)[start : start + 32], dpi)
        for path, numbers in by_document.items()
        for start in range(0, len(numbers), 32)
    ]
    rendered: dict[tuple[str, int], tuple[bytes, str]] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for (path, numbers, _), pages in zip(tasks, pool.map(render_pages, tasks), strict=True):
            rendered.update({(path, n): page for n, page in zip(numbers, pages, strict=True)})
    return [rendered[(attempt.path, attempt.page_no)] for attempt in attempts]


def replay_requests(
    attempts: list[Attempt], pages: list[tuple[bytes, str]], max_new_tokens: int
) -> list[Callable]:
    """Builders of the attempts' `OcrRequest`s, each decoding its PNG as the worker does."""

    def builder(index: int, attempt: Attempt, png: bytes) -> Callable[[], OcrRequest]:
        def build() -> OcrRequest:
            image = Image.open(io.BytesIO(png))
            image.load()
            return OcrRequest(
                key=str(index),
                image=image,
                mode=Mode(attempt.mode),
                page_width=attempt.width,
                page_height=attempt.height,
                estimated_text_tokens=attempt.estimated_tokens,
                max_new_tokens=max_new_tokens,
            )

        return build

    return [
        builder(index, attempt, png)
        for index, (attempt, (png, _)) in enumerate(zip(attempts, pages, strict=True))
    ]


def served_match(work: Path, attempts: list[Attempt], pages: list[tuple[bytes, str]]) -> dict:
    """How many replayed pages the worker served with the same pixels and mode."""
    served = Counter()
    with contextlib.suppress(OSError):
        for line in (work / "worker-served.jsonl").read_text().splitlines():
            record = json.loads(line)
            served[(record["digest"], record["mode"])] += 1
    matched = 0
    for attempt, (_, digest) in zip(attempts, pages, strict=True):
        if served[(digest, attempt.mode)] > 0:
            served[(digest, attempt.mode)] -= 1
            matched += 1
    return {"replayed": len(attempts), "same_pixels_and_mode_as_served": matched}


class ReplayFeed:
    """The engine-alone run's `PageFeed`: a pool of threads decodes and prepares pages ahead of
    the decode loop, never more than `ahead` at once (as the worker's in-flight limit)."""

    def __init__(
        self,
        engine: ForcedLengthEngine,
        requests: list[Callable[[], OcrRequest]],
        ahead: int,
        threads: int,
    ) -> None:
        self.engine, self.total = engine, len(requests)
        self._todo: queue.Queue = queue.Queue()
        for index, make in enumerate(requests):
            self._todo.put((index, make))
        self._ready: queue.Queue = queue.Queue()
        self._room = threading.Semaphore(ahead)
        self.taken = 0
        self.starved_waits = 0  # times the decode loop had room but no prepared page
        self.error: BaseException | None = None
        self._workers = [
            threading.Thread(target=self._prepare, name=f"prepare-{n}", daemon=True)
            for n in range(threads)
        ]
        for thread in self._workers:
            thread.start()

    def _prepare(self) -> None:
        while True:
            try:
                _index, make = self._todo.get_nowait()
            except queue.Empty:
                return
            self._room.acquire()
            try:
                self._ready.put(self.engine.prepare(make()))
            except BaseException as error:  # surfaces in `take`
                self.error = error
                self._ready.put(None)

    def wait_ready(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._ready.qsize() < min(count, self.total) and time.monotonic() < deadline:
            time.sleep(0.05)

    def finished(self) -> None:
        self._room.release()

    def take(self, limit: int, *, wait: bool) -> list | None:
        if self.taken >= self.total:
            return None
        pages = []
        if wait or self._ready.empty():
            if self._ready.empty():
                self.starved_waits += 1
            if wait:
                pages.append(self._ready.get())
        while len(pages) < limit and not self._ready.empty():
            pages.append(self._ready.get_nowait())
        if any(page is None for page in pages):
            raise RuntimeError("preparing a page failed") from self.error
        self.taken += len(pages)
        return pages


class TimeUp(Exception):
    """Raised out of the decode loop when the engine-alone run reaches its deadline."""


def run_engine_alone(
    engine: ForcedLengthEngine,
    requests: list[Callable[[], OcrRequest]],
    *,
    ahead: int,
    threads: int,
    deadline: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The same pages through the engine's streaming decode loop in this process (no Prefect,
    no Postgres), fed by `ReplayFeed`; times from the first decode call to the last page."""
    feed = ReplayFeed(engine, requests, ahead=ahead, threads=threads)
    feed.wait_ready(ahead, timeout=120)
    finished: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []

    def on_finished(page, outcome) -> None:
        feed.finished()
        finished.append(time.time())
        if isinstance(outcome, Exception):
            errors.append(f"{type(outcome).__name__}: {outcome}")
            return
        tokens.append(outcome.output_tokens)  # no `result`: the worker builds it off the loop
        if len(finished) % 250 == 0:
            log(f"engine alone: {len(finished)}/{feed.total} pages")
        if time.time() > deadline:
            raise TimeUp  # the rate then counts the pages finished by now, like a cut pipeline

    started = time.time()
    try:
        engine.serve(feed, on_finished)
    except TimeUp:
        log(f"engine alone: time budget reached after {len(finished)}/{feed.total} pages")
    ended = max(finished, default=started)
    return {
        "pages": len(tokens),
        "failed": len(errors),
        "errors": errors[:5],
        "seconds": ended - started,
        "started": started,
        "ended": ended,
        "first_page_seconds": (min(finished) - started) if finished else None,
        "output_tokens": sum(tokens),
        "starved_waits": feed.starved_waits,
        "complete": len(finished) >= feed.total,
    }


def run_engine_phase(
    args,
    attempts: list[Attempt],
    worker_stats: dict,
    work: Path,
    deadline: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Render the attempts' pages, build the model again (the worker has exited and freed
    the GPU) with the worker's slots, and time the engine alone over them.

    A pipeline stopped early may have stored fewer attempts than the engine has slots; decoded
    alone, such a set is one ramp and one tail, not the engine's speed. So the attempts are
    cycled (same pixels, modes and lengths again) to at least `MIN_SLOT_FILLS` times the slots.
    """
    dpi = Settings().render_dpi
    started = time.time()
    pages = render_attempts(attempts, dpi, workers=max(1, min(16, (os.cpu_count() or 2) - 1)))
    log(f"engine alone: rendered {len(pages)} pages in {time.time() - started:.1f} s")
    match = served_match(work, attempts, pages)
    engine = build_random_engine(
        tiny=args.tiny, device=args.device, max_new_tokens=args.max_new_tokens
    )
    engine.settings = replace(engine.settings, max_batch=worker_stats["slots"])
    captured = time.time()
    graphs = warm_up(engine, Settings())  # as the worker did before the pipeline's clock
    warmed = time.time() - captured
    log(f"engine alone: view shapes encoded, {graphs} decode graphs captured in {warmed:.1f} s")
    forced = ForcedLengthEngine(engine, LengthModel(args.lengths, high=args.max_tokens))
    requests = replay_requests(attempts, pages, args.max_new_tokens)
    wanted = max(len(requests), MIN_SLOT_FILLS * worker_stats["slots"])
    cycles = math.ceil(wanted / len(requests))
    requests = (requests * cycles)[:wanted]
    threads = max(2, min(8, (os.cpu_count() or 2) // 2))
    log(
        f"engine alone: {len(requests)} pages, {worker_stats['slots']} slots, "
        f"{threads} preparing threads"
    )
    outcome = run_engine_alone(
        forced,
        requests,
        ahead=worker_stats["in_flight_limit"],
        threads=threads,
        deadline=deadline,
        log=log,
    )
    generator = engine.resident.generator
    return {
        **outcome,
        **match,
        "cycles": cycles,
        "graphs_captured_ahead": graphs,
        "loop_seconds": dict(generator.loop_seconds) if generator is not None else None,
        "admissions": dict(generator.admissions) if generator is not None else None,
        "gpu_memory": gpu_memory(args.device),
    }


__all__ = ["Attempt", "ReplayFeed", "ocr_attempts", "run_engine_alone", "run_engine_phase"]
