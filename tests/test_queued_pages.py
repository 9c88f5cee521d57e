"""The CPU side of the GPU queue page by page: pages stored as they settle (not when their window
does), a bounded number of pages rendered ahead, answers streamed from the real queue and a real
worker, and pages stored in batches where one page's fault loses no other."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pymupdf
import pytest
from PIL import Image
from sqlalchemy import func, select

from flows.ingest import ingest
from infra.db.models import OcrJob, Page, PageResult, PageStatus
from infra.db.repository import AttemptRecord, PageRecord
from infra.db.session import session_scope
from infra.errors import EngineUnavailable
from infra.settings import Settings
from infra.vocabulary import Mode, Route
from models.engine import FinishReason, OcrRequest, OcrResult
from models.queue_engine import QueueEngine
from tasks import queued, staging
from tasks.pages import PageWork, listed_pages, prepare_page_chunk, settle_without_ocr
from tasks.split import SourcePage, open_document
from tasks.staging import StagedImage
from tasks.steps import PageWriter
from tests.born_digital import SCAN_TEXT, scanned_page, write_pdf
from tests.conftest import url_new_to_this_process
from tests.test_ingest import count_rows, use_database
from tests.test_ocr_queue import SizeEchoEngine, make_worker, wait_until_live

LETTER = (612.0, 792.0)  # the held page's size; the others are A4


@dataclass
class GatedEngine:
    """Reads every page as `SCAN_TEXT` at once, except a US Letter page, which it holds until
    `release` is set. Notes how many jobs the queue holds whenever it is called."""

    url: str
    release: threading.Event = field(default_factory=threading.Event)
    holding: threading.Event = field(default_factory=threading.Event)
    queued_seen: list[int] = field(default_factory=list)
    name: str = "gated"
    model_revision: str = "test"

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]:
        self.queued_seen.append(count_rows(self.url, OcrJob))
        if any((r.page_width, r.page_height) == LETTER for r in requests):
            self.holding.set()
            self.release.wait(timeout=120)
        return [
            OcrResult(r.key, SCAN_TEXT, [], SCAN_TEXT, FinishReason.EOS, self.name, "test", r.mode)
            for r in requests
        ]


def scans_then_a_letter_page(path: Path, scans: int) -> Path:
    document = pymupdf.open()
    for _ in range(scans):
        scanned_page(document)
    pixmap = document[0].get_pixmap(dpi=100, colorspace=pymupdf.csGRAY)
    letter = document.new_page(width=LETTER[0], height=LETTER[1])
    letter.insert_image(letter.rect, pixmap=pixmap)
    document.save(path)
    return path


def test_the_pages_ahead_budget_says_how_much_room_is_taken_and_who_waits(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """--verbose shows whether the budget holds windows back: room taken, windows waiting."""
    monkeypatch.setattr(queued, "STATE_LOG_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="tasks.queued")
    budget, settings = queued.PagesAhead(), Settings(queue_pages_ahead=4)
    windows = [StagesOf((2, 1, 0)), StagesOf((1, 0, 2))]  # how windows report their pages
    budget.watch(windows[0])
    budget.watch(windows[1])
    assert budget.take(4, order=0, settings=settings, wait=False) == 4
    assert budget.take(1, order=0, settings=settings, wait=False) == 0
    granted: list[int] = []
    waiter = threading.Thread(
        target=lambda: granted.append(budget.take(2, order=1, settings=settings, wait=True))
    )
    waiter.start()
    deadline = time.monotonic() + 10
    waiting = (
        "pages ahead: 4 of 4 taken (3 being rendered, 1 in the queue or on a GPU, 2 answered "
        "and not yet judged), 1 windows waiting for room, 1 asked for more than was free since "
        "the last line"
    )
    while waiting not in caplog.messages:
        assert time.monotonic() < deadline, caplog.messages
        time.sleep(0.01)
    budget.give_back(3)
    waiter.join(10)
    assert granted == [2]
    del windows[1]  # a window that ended no longer counts
    budget.give_back(1)
    assert caplog.messages[-1] == (
        "pages ahead: 2 of 4 taken (2 being rendered, 1 in the queue or on a GPU, 0 answered "
        "and not yet judged), 0 windows waiting for room, 0 asked for more than was free since "
        "the last line"
    )


@dataclass
class StagesOf:
    """A window as `PagesAhead` sees it: its pages by stage."""

    counts: tuple[int, int, int]

    def stages(self) -> tuple[int, int, int]:
        return self.counts

    __hash__ = object.__hash__


@pytest.mark.usefixtures("prefect_server")
def test_pages_are_stored_as_they_settle_with_few_rendered_ahead(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """One window of six scans through the real queue and a worker that decodes one page at a
    time. The last page is held: the five before it are stored while their window is still
    open. At most three pages are rendered and unsettled at any time (`queue_pages_ahead`), and
    the worker keeps no image bytes of the page it holds."""
    pdf = scans_then_a_letter_page(tmp_path / "scans.pdf", scans=5)
    use_database(monkeypatch, postgres_url, engine="queue", cpu_workers="1", queue_pages_ahead="3")
    engine = GatedEngine(postgres_url)
    worker = make_worker(postgres_url, engine, max_batch=1, once=False)
    serving = threading.Thread(target=worker.run)
    serving.start()
    stored_while_held: list[int] = []
    stages_while_held: list[tuple[int, int, int]] = []
    held_images: list[bytes] = []

    def release_once_the_others_are_stored() -> None:
        deadline = time.monotonic() + 120
        done = Page.status == "done"
        while time.monotonic() < deadline and not (
            engine.holding.is_set() and count_rows(postgres_url, Page, done) >= 5
        ):
            time.sleep(0.05)
        stored_while_held.append(count_rows(postgres_url, Page, done))
        stages_while_held.extend(window.stages() for window in list(queued.PAGES_AHEAD._windows))
        held_images.extend(job.spec.image for _, job in worker.feeder._held.values())
        engine.release.set()

    watcher = threading.Thread(target=release_once_the_others_are_stored)
    try:
        wait_until_live(postgres_url)
        watcher.start()
        [outcome] = ingest([str(pdf)])
    finally:
        engine.release.set()
        worker.request_stop()
        serving.join()
        watcher.join()
    assert outcome["status"] == "done", outcome
    assert stored_while_held == [5]
    assert stages_while_held == [(0, 1, 0)]  # nothing to render, the held page on the worker
    assert held_images == [b""]  # the worker holds the page it decodes, not its image bytes
    assert 0 < max(engine.queued_seen) <= 3
    with session_scope(postgres_url) as session:
        assert session.scalar(select(func.count()).where(PageResult.accepted)) == 6
        assert session.scalar(select(func.count()).select_from(OcrJob)) == 0


def page_record(page_no: int, route: str = "ocr") -> PageRecord:
    attempt = AttemptRecord(
        result_fields={
            "route": "ocr",
            "mode": "tiny",
            "engine": "test",
            "model_revision": "test",
            "markdown": f"page {page_no}",
            "blocks": [],
            "raw_output": "",
            "finish_reason": "eos",
            "accepted": True,
            "rejection_reason": None,
        },
        token_fields=None,
    )
    fields = {"route": route, "mode": "tiny", "status": "done", "error": None}
    return PageRecord(page_no, 612.0, 792.0, fields, [attempt])


def test_a_page_that_cannot_be_stored_loses_no_other_page(postgres_url: str, tmp_path) -> None:
    from infra.db.models import Document

    with session_scope(postgres_url) as session:
        document = Document(source_uri=f"file://{tmp_path}/x.pdf", pipeline_version="test")
        session.add(document)
        session.flush()
        document_id = document.id
    writer = PageWriter(document_id, Settings(database_url=postgres_url))
    first, bad, third = page_record(1), page_record(2, route="x" * 500), page_record(3)
    writer.write([first, bad, third])
    writer.write([first, third])  # written again (a retried write): nothing new

    assert len(writer.faults) == 1
    with pytest.raises(Exception, match="value too long"):
        writer.raise_first_fault()
    with session_scope(postgres_url) as session:
        pages = session.execute(select(Page.page_no, Page.attempts).order_by(Page.page_no)).all()
        results = session.scalar(select(func.count()).select_from(PageResult))
    assert [tuple(row) for row in pages] == [(1, 1), (3, 1)]
    assert results == 2


@pytest.fixture
def fresh_queue_url(database_url: str, request: pytest.FixtureRequest) -> str:
    return url_new_to_this_process(database_url, request)


def test_a_stream_answers_pages_as_they_finish_and_takes_more_on_the_way(
    database_url: str,
) -> None:
    worker = make_worker(database_url, SizeEchoEngine(), max_batch=1, once=False)
    serving = threading.Thread(target=worker.run)
    serving.start()
    try:
        wait_until_live(database_url)
        stream = QueueEngine(database_url, worker_grace_seconds=30, poll_seconds=0.05).stream()
        first = OcrRequest("1", Image.new("RGB", (51, 30)), Mode.TINY, 612.0, 792.0)
        stream.add([first])
        answers = []
        while not answers:
            answers = stream.take(timeout=5)
        stream.add([OcrRequest("1", first.image, Mode.BASE, 612.0, 792.0)])  # an escalation
        while stream.outstanding:
            answers += stream.take(timeout=5)
        stream.close()
    finally:
        worker.request_stop()
        serving.join()
    assert [(request.mode, result.markdown) for request, result in answers] == [
        (Mode.TINY, "51x30 tiny"),
        (Mode.BASE, "51x30 base"),
    ]
    assert count_rows(database_url, OcrJob) == 0  # collected as answered


def test_without_a_worker_a_stream_gives_up_once_then_answers_at_once(
    fresh_queue_url: str,
) -> None:
    engine = QueueEngine(fresh_queue_url, worker_grace_seconds=0.3, poll_seconds=0.05)
    request = OcrRequest("1", Image.new("RGB", (20, 20)), Mode.TINY, 612.0, 792.0)
    stream = engine.stream()
    stream.add([request])
    [(_, error)] = stream.take(timeout=10)
    assert isinstance(error, EngineUnavailable) and "no live GPU worker" in str(error)
    stream.close()

    started = time.monotonic()
    later = engine.stream()
    later.add([request])
    [(_, error)] = later.take(timeout=10)
    later.close()
    assert "no GPU worker has beaten since" in str(error)
    assert time.monotonic() - started < 0.3
    assert count_rows(fresh_queue_url, OcrJob) == 0


def test_a_stream_waiting_for_answers_wakes_for_other_work(fresh_queue_url: str) -> None:
    """`wake` ends a `take` waiting for answers (a window whose rendered chunk is back), and
    one called before `take` makes it return at once: a window does not poll its chunks."""
    engine = QueueEngine(fresh_queue_url, worker_grace_seconds=60, poll_seconds=0.05)
    stream = engine.stream()
    stream.add([OcrRequest("1", Image.new("RGB", (20, 20)), Mode.TINY, 612.0, 792.0)])
    waker = threading.Timer(0.3, stream.wake)
    waker.start()
    started = time.monotonic()
    assert stream.take(timeout=20) == []  # no worker: nothing but the wake ends the wait
    assert 0.2 < time.monotonic() - started < 10
    stream.wake()
    started = time.monotonic()
    assert stream.take(timeout=20) == []
    assert time.monotonic() - started < 1
    assert stream.outstanding == 1  # the page still waits for its answer
    stream.close()


def test_text_layers_are_read_in_the_cpu_worker_and_not_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU worker's `prepare_page_chunk` reads a text-layer page's layer into its result,
    which travels back pickled; settling the page uses it without reading the page again
    (PyMuPDF holds the GIL of the process that queues and stores the pages)."""
    pdf = write_pdf(tmp_path / "born-digital.pdf", ["german-math", "table", "arabic"])
    settings = Settings()
    prepared = pickle.loads(pickle.dumps(prepare_page_chunk(pdf, settings, [1, 2, 3])))
    with open_document(pdf, settings) as document:
        pages = list(listed_pages(document, [1, 2, 3]))
        read_here = [page.text_layer_result() for page in pages]
        monkeypatch.setattr(SourcePage, "text_layer_result", lambda page: pytest.fail("read"))
        settled = 0
        for item, page, expected in zip(prepared, pages, read_here, strict=True):
            if item.plan.decision is None or item.plan.decision.route != Route.TEXT_LAYER:
                assert item.text_layer is None
                continue
            assert item.text_layer.markdown == expected.markdown
            work = PageWork(item.plan, item.plan.decision.mode)
            settle_without_ocr(work, page, item.text_layer)
            assert (work.status, work.route) == (PageStatus.DONE, Route.TEXT_LAYER)
            settled += 1
    assert settled >= 2


def ingest_served_by_size_echo(pdf: Path, url: str) -> dict:
    """`ingest` of one document while a worker answers each page with its size and mode."""
    worker = make_worker(url, SizeEchoEngine(), once=False)
    serving = threading.Thread(target=worker.run)
    serving.start()
    try:
        wait_until_live(url)
        [outcome] = ingest([str(pdf)])
    finally:
        worker.request_stop()
        serving.join()
    return outcome


def test_pool_workers_hand_page_images_over_in_files_that_do_not_outlive_the_run(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With CPU worker processes, each rendered page reaches the queue through a staged file
    (not the pool's pipe) holding the same pixels a render in this process gives, and every
    file is gone once the run is."""
    pdf = scans_then_a_letter_page(tmp_path / "scans.pdf", scans=3)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(staging, "_directory", None)
    taken: list[int] = []
    take = StagedImage.take
    monkeypatch.setattr(StagedImage, "take", lambda image: taken.append(1) or take(image))
    use_database(monkeypatch, postgres_url, engine="queue", cpu_workers="2")
    assert ingest_served_by_size_echo(pdf, postgres_url)["status"] == "done"
    settings = Settings()
    with open_document(pdf, settings) as document:
        sizes = [page.render(settings.render_dpi).size for page in document.iter_pages()]
    with session_scope(postgres_url) as session:
        read = session.execute(
            select(Page.page_no, PageResult.markdown).join(Page, Page.id == PageResult.page_id)
        ).all()
    # Each page's every attempt (SizeEchoEngine's answers are too short: the pages climb the
    # mode ladder, their escalations sent with the bytes taken once) saw the same pixels.
    assert {(n, text.split()[0]) for n, text in read} == {
        (n, f"{w}x{h}") for n, (w, h) in enumerate(sizes, start=1)
    }
    assert len(read) > 4
    assert len(taken) == 4
    [directory] = temp.glob(f"{staging.PREFIX}*")
    assert list(directory.iterdir()) == []


def test_a_staging_directory_left_by_a_killed_process_is_removed_by_the_next(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(staging, "_directory", None)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    host = staging._host()
    orphan = tmp_path / f"{staging.PREFIX}{gone.stdout.strip()}@{host}-abc"
    alive = tmp_path / f"{staging.PREFIX}{os.getppid()}@{host}-def"
    elsewhere = tmp_path / f"{staging.PREFIX}{gone.stdout.strip()}@another_host-ghi"
    for directory in (orphan, alive, elsewhere):
        directory.mkdir()
        (directory / "page.img").write_bytes(b"pixels")
    mine = Path(staging.staging_directory())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (alive, elsewhere, mine)
    )
    image = staging.stage(b"page bytes", str(mine))
    assert isinstance(image, StagedImage) and image.take() == b"page bytes"
    assert list(mine.iterdir()) == []
    assert staging.stage(b"page bytes", None) == b"page bytes"
    unwritable = tmp_path / "not-a-directory"
    unwritable.write_bytes(b"")
    monkeypatch.setattr(tempfile, "tempdir", str(unwritable))
    monkeypatch.setattr(staging, "_directory", None)
    assert staging.staging_directory() is None  # the images then go through the pipe


def test_a_windows_first_page_is_rendered_alone_the_rest_in_chunks(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The first page of a window reaches the queue after one page's render, not a chunk's;
    every page is still prepared once."""
    pdf = scans_then_a_letter_page(tmp_path / "scans.pdf", scans=6)
    use_database(monkeypatch, postgres_url, engine="queue", cpu_workers="1")
    chunks: list[list[int]] = []
    prepare = queued.prepare_page_chunk
    monkeypatch.setattr(
        queued,
        "prepare_page_chunk",
        lambda path, settings, numbers, **kw: (
            chunks.append(numbers) or prepare(path, settings, numbers, **kw)
        ),
    )
    assert ingest_served_by_size_echo(pdf, postgres_url)["status"] == "done"
    assert chunks[0] == [1]
    assert all(len(chunk) <= queued.CHUNK_PAGES for chunk in chunks[1:])
    assert sorted(n for chunk in chunks for n in chunk) == list(range(1, 8))
