"""A window of pages through the GPU queue (`OCRFLOW_ENGINE=queue`), page by page.

The CPU workers route and render a few pages at a time (`prepare_page_chunk`), as far ahead as
the process's budget of pages ahead allows (`PagesAhead`). Each page is queued as soon as its
chunk is back and judged as soon as its answer is: an escalation goes back at once with the
pixels it came with (no new render), and every page that settles (accepted, needs_review,
failed, or postponed) goes to `on_settled` with the others that settled in the same poll. So
the first pages reach a worker seconds after the run starts, a page is stored when it settles
rather than when its window's slowest page does, and the ingest process holds encoded bytes of
a bounded number of pages, never decoded images.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import weakref
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from functools import partial
from pathlib import Path

from PIL import Image

from infra.db import ocr_queue
from infra.db.models import PageStatus
from infra.db.repository import PageRecord
from infra.db.session import session_scope
from infra.errors import UnreadablePage, is_infrastructure
from infra.memory import release_large_buffers
from infra.settings import Settings
from infra.vocabulary import Route
from models.engine import OcrRequest
from models.queue_engine import Answer, QueueEngine
from tasks.pages import (
    PageWork,
    PreparedPage,
    SettledHandler,
    fail_page,
    listed_pages,
    ocr_request,
    plan_page_chunk,
    postpone,
    prepare_page_chunk,
    report_settled,
    settle_without_ocr,
    take_outcome,
    to_record,
)
from tasks.parallel import in_pool, map_page_chunks, submit_page_chunk
from tasks.split import SourcePage, open_document
from tasks.staging import StagedImage, staging_directory

logger = logging.getLogger(__name__)

CHUNK_PAGES = 4  # pages per CPU-worker call: small, so the first pages are queued soon
LIMIT_TTL_SECONDS = 5.0  # how long a limit read from the live workers' slots is kept
STATE_LOG_SECONDS = 5.0  # at most how often --verbose says how much room is taken


class PagesAhead:
    """Pages this process has routed and rendered for the queue and not yet settled, over every
    window and document: the ingest process's memory bound. A window takes room before a chunk
    is rendered and gives it back as the chunk's pages settle. When room is short, lower
    `order` (a document's earlier windows) goes first, so every document's first window is
    queued before any second one.

    With `--verbose` it says every few seconds how much room is taken and by what (pages being
    rendered, in the queue or on a GPU, answered and waiting to be judged), how many windows
    wait for some and how often one got less than it asked: a run whose GPU workers run short
    of pages while windows are refused here is held by this budget, one with room to spare by
    the rendering or the judging; a budget full of answered pages says the judging and storing
    of this process is behind.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._taken = 0
        self._waiting: Counter[int] = Counter()
        self._limit: tuple[float, int] | None = None  # (read at, pages)
        self._logged = 0.0  # monotonic time of the last state line
        self._last_limit = 0  # the limit the last `take` went by, for the state line
        self._cut_short = 0  # takes granted less than asked since the last state line
        self._windows: weakref.WeakSet[_QueuedWindow] = weakref.WeakSet()  # for the state line

    def watch(self, window: _QueuedWindow) -> None:
        """Counts `window`'s pages by stage in the state line while it lives."""
        with self._changed:
            self._windows.add(window)

    def take(self, pages: int, *, order: int, settings: Settings, wait: bool) -> int:
        """Room for up to `pages` pages; at least one when `wait`, else possibly none."""
        with self._changed:
            self._waiting[order] += 1
        try:
            while True:
                limit = self.limit(settings)  # outside the lock: it may read the database
                with self._changed:
                    self._last_limit = limit
                    free = limit - self._taken
                    if free > 0 and order <= min(self._waiting):
                        granted = min(pages, free)
                        self._taken += granted
                        self._cut_short += granted < pages
                        return granted
                    if not wait:
                        self._cut_short += 1
                        return 0
                    self._log_state()
                    self._changed.wait(LIMIT_TTL_SECONDS)  # or the limit grows meanwhile
        finally:
            with self._changed:
                self._waiting[order] -= 1
                if not self._waiting[order]:
                    del self._waiting[order]
                self._changed.notify_all()

    def give_back(self, pages: int) -> None:
        if pages:
            with self._changed:
                self._taken -= pages
                self._changed.notify_all()
                self._log_state()

    def _log_state(self) -> None:
        """One INFO line at most every `STATE_LOG_SECONDS` (call with `_changed` held)."""
        now = time.monotonic()
        if now - self._logged >= STATE_LOG_SECONDS:
            self._logged = now
            stages = [window.stages() for window in list(self._windows)]
            rendering, queued, answered = (
                sum(counts) for counts in zip((0, 0, 0), *stages, strict=True)
            )
            logger.info(
                "pages ahead: %d of %d taken (%d being rendered, %d in the queue or on a GPU, "
                "%d answered and not yet judged), %d windows waiting for room, %d asked for "
                "more than was free since the last line",
                self._taken,
                self._last_limit,
                rendering,
                queued,
                answered,
                sum(self._waiting.values()),
                self._cut_short,
            )
            self._cut_short = 0

    def limit(self, settings: Settings) -> int:
        """The setting, else twice the live workers' slots (what they hold plus as much
        waiting), at least one window; read again every few seconds."""
        if settings.queue_pages_ahead is not None:
            return max(1, settings.queue_pages_ahead)
        now = time.monotonic()
        if self._limit is None or now - self._limit[0] > LIMIT_TTL_SECONDS:
            try:
                with session_scope(settings.database_url) as session:
                    workers = ocr_queue.live_workers(session=session)
                slots = sum(worker.capacity for worker in workers)
            except Exception:  # the database blinked: keep what we had
                logger.warning("could not read the GPU workers' slots", exc_info=True)
                slots = 0
            self._limit = (now, max(settings.page_window, 2 * slots))
        return self._limit[1]


PAGES_AHEAD = PagesAhead()


def _discard_staged(future: Future[list[PreparedPage]]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    for prepared in future.result():
        if isinstance(prepared.rendered, tuple) and isinstance(prepared.rendered[0], StagedImage):
            prepared.rendered[0].discard()


def recognize_window(
    path: Path,
    settings: Settings,
    page_numbers: list[int],
    engine: QueueEngine,
    on_settled: SettledHandler,
    order: int = 0,
) -> list[PageRecord]:
    """Routes, renders and recognises a window's pages through the queue, each page handed to
    `on_settled` as it settles; returns every page's record."""
    release_large_buffers()  # the page images this process queues: mapped, not arena holes
    with open_document(path, settings) as document:
        pages = {page.page_no: page for page in listed_pages(document, page_numbers)}
        window = _QueuedWindow(path, settings, engine, on_settled, order, pages)
        try:
            window.run(page_numbers)
        finally:
            window.close()
    return [to_record(work) for work in window.works.values()]


class _QueuedWindow:
    """The loop of one window: render ahead, queue what is rendered, judge what is answered."""

    def __init__(
        self,
        path: Path,
        settings: Settings,
        engine: QueueEngine,
        on_settled: SettledHandler,
        order: int,
        pages: dict[int, SourcePage],
    ) -> None:
        self.path, self.settings, self.engine = path, settings, engine
        self.on_settled, self.order, self.pages = on_settled, order, pages
        self.works: dict[int, PageWork] = {}
        self.stream = engine.stream()
        self.rendering: dict[Future[list[PreparedPage]], list[int]] = {}
        self.held: set[int] = set()  # pages holding room in PAGES_AHEAD
        self.rendering_pages = 0  # pages of the chunks in `rendering`
        self.reported: set[int] = set()
        self.engine_away: Exception | None = None
        # Pool workers stage their images in files: through the pool's pipe, the bytes held
        # up every chunk's result (`tasks.staging`).
        self.prepare = (
            partial(prepare_page_chunk, stage_in=staging_directory())
            if in_pool(settings)
            else prepare_page_chunk
        )
        PAGES_AHEAD.watch(self)

    def run(self, page_numbers: list[int]) -> None:
        # The first page goes alone: it reaches the queue one page's render after the window
        # starts, not a chunk's, so the GPU workers start on a run's first pages sooner.
        first, rest = page_numbers[:1], page_numbers[1:]
        todo = deque([first] if first else [])
        todo.extend(rest[i : i + CHUNK_PAGES] for i in range(0, len(rest), CHUNK_PAGES))
        while todo or self.rendering or self.stream.outstanding:
            if self.engine_away is not None and todo:
                self._postpone_unrendered([n for chunk in todo for n in chunk])
                todo.clear()
            rendered_here = self._render_ahead(todo)
            self._queue_rendered()
            self._judge_answers(wait=not rendered_here)

    def stages(self) -> tuple[int, int, int]:
        """This window's pages being rendered, in the queue or on a GPU, and answered but not
        yet judged (read from other threads: plain counts)."""
        return self.rendering_pages, self.stream.queued, self.stream.waiting_answers

    def close(self) -> None:
        for future in self.rendering:
            if not future.cancel():  # rendering or rendered: its staged images are not wanted
                future.add_done_callback(_discard_staged)
        self.stream.close()
        PAGES_AHEAD.give_back(len(self.held))
        self.held.clear()

    def _render_ahead(self, todo: deque[list[int]]) -> bool:
        """Sends chunks to the CPU workers while there is room; waits for room only when this
        window has nothing else to wait for. True when a chunk was rendered in this process
        (one CPU worker): the loop then looks at answers without waiting, and renders on."""
        while todo and self.engine_away is None:
            busy = bool(self.rendering or self.stream.outstanding)
            chunk = todo.popleft()
            granted = PAGES_AHEAD.take(
                len(chunk), order=self.order, settings=self.settings, wait=not busy
            )
            if granted < len(chunk):
                todo.appendleft(chunk[granted:])
                chunk = chunk[:granted]
            if not chunk:
                return False
            self.held.update(chunk)
            future = submit_page_chunk(self.prepare, self.path, self.settings, chunk)
            self.rendering[future] = chunk
            self.rendering_pages += len(chunk)
            # A window waiting for answers wakes when the chunk is back instead of polling for
            # it: at 20 looks a second, the 64 windows in flight on the H200 host woke the
            # ingest process ~1,300 times a second, whose main process ran at ~1 core when the
            # CPU side fell behind the GPU (`bench.e2e_gpu`, 4,000 pages).
            future.add_done_callback(lambda _: self.stream.wake())
            if future.done():  # rendered in this process: queue it before rendering more
                return True
        return False

    def _queue_rendered(self) -> None:
        """Queues the pages of every chunk that is back; settles those that need no OCR."""
        if not self.stream.outstanding and self.rendering:
            wait(self.rendering, timeout=1.0, return_when=FIRST_COMPLETED)
        requests: list[OcrRequest] = []
        for future in [future for future in self.rendering if future.done()]:
            self.rendering_pages -= len(self.rendering.pop(future))
            for prepared in future.result():
                request = self._admit(prepared)
                if request is not None:
                    requests.append(request)
        self.stream.add(requests)
        self._report()

    def _admit(self, prepared: PreparedPage) -> OcrRequest | None:
        """A routed page's work; its request when it goes to the queue."""
        plan = prepared.plan
        work = self.works[plan.page_no] = PageWork(plan, plan.decision and plan.decision.mode)
        if plan.decision is None:
            fail_page(work, UnreadablePage(plan.error or "page cannot be read"))
        elif plan.decision.route != Route.OCR:
            settle_without_ocr(work, self.pages[plan.page_no], prepared.text_layer)
        elif isinstance(prepared.rendered, Exception):
            fail_page(work, prepared.rendered)
        else:
            work.route = Route.OCR
            wire_image, orientation = prepared.rendered
            if isinstance(wire_image, StagedImage):
                try:
                    wire_image = wire_image.take()
                except OSError as error:  # the file went missing: not the page's fault
                    postpone(work, error, self.engine)
                    return None
            # Image.open is lazy: the queue forwards the encoded bytes, nothing decodes them.
            image = Image.open(io.BytesIO(wire_image))
            work.request = ocr_request(work, image, wire_image, orientation, self.settings)
            return work.request
        return None

    def _judge_answers(self, *, wait: bool) -> None:
        """Judges the answers that arrived (waiting a little for one when `wait`); escalations
        go back to the queue at once."""
        if not self.stream.outstanding:
            return
        answers = self.stream.take(1.0 if wait else 0.0)
        self.stream.add([r for r in map(self._judge, answers) if r is not None])
        self._report()

    def _judge(self, answer: Answer) -> OcrRequest | None:
        request, outcome = answer
        work = self.works[int(request.key)]
        if isinstance(outcome, Exception) and is_infrastructure(outcome):
            self.engine_away = self.engine_away or outcome
        take_outcome(work, outcome, self.pages[work.plan.page_no], self.engine)
        if work.status != PageStatus.PENDING:
            return None
        orientation = work.plan.features["orientation"]
        work.request = ocr_request(
            work, request.image, request.wire_image, orientation, self.settings
        )
        return work.request

    def _postpone_unrendered(self, page_numbers: list[int]) -> None:
        """The engine is away: the window's other pages are routed (their records need a
        route) but not rendered, and postponed with the same error."""
        for plan in map_page_chunks(plan_page_chunk, self.path, self.settings, page_numbers):
            work = self.works[plan.page_no] = PageWork(plan, plan.decision and plan.decision.mode)
            if plan.decision is None:
                fail_page(work, UnreadablePage(plan.error or "page cannot be read"))
            elif plan.decision.route != Route.OCR:
                settle_without_ocr(work, self.pages[plan.page_no])
            else:
                work.route = Route.OCR
                postpone(work, self.engine_away, self.engine)
        self._report()

    def _report(self) -> None:
        settled = report_settled(self.works.values(), self.reported, self.on_settled)
        for work in settled:
            work.request = None
            if work.plan.page_no in self.held:
                self.held.discard(work.plan.page_no)
                PAGES_AHEAD.give_back(1)


__all__ = ["PAGES_AHEAD", "PagesAhead", "recognize_window"]
