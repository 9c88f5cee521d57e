"""Per-window page work as plain functions: route pages, then recognise them with escalation.

A window is opened, worked and closed as a unit, so a 2,000-page document never holds more
than one window of pages (and one OCR batch of rendered images) in memory. Pages are handed
to the caller as they settle, so they are stored before the window ends. (The GPU queue's
path, page by page with a bound on pages rendered ahead, is `tasks.queued`.)

Every page ends the window in one of four ways: accepted (`done`), `needs_review` (OCR
rejected on every rung), `failed` (the page itself cannot be read: permanent), or `retrying`
(the engine raised: a worker away, a timeout, out of memory; the next run tries again). A
page's fault never stops the other pages.

An OCR reading is accepted only when it passes validation (no loop, no truncation) and the
cross-check (`tasks.crosscheck`): not empty on a page with ink, and, where the page has a
trustworthy text layer, neither a lost script nor most of the layer's words missing. A reading
that fails is a quality verdict, not a fault: it climbs the mode ladder like any rejection.
Every attempt that read something gets token statistics (`tasks.token_stats`).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from infra.db.models import ERROR_FINISH, PageStatus
from infra.db.repository import AttemptRecord, PageRecord
from infra.errors import PermanentInputError, UnreadablePage, is_infrastructure
from infra.settings import Settings
from infra.vocabulary import Mode, Route
from models.deepseek_ocr.tokenizer import load_tokenizer
from models.engine import (
    FinishReason,
    OcrEngine,
    OcrRequest,
    OcrResult,
    recognize_isolating_failures,
)
from models.queue_engine import encode_image
from models.registry import engine_capabilities
from tasks.crosscheck import content_chars, cross_check, is_near_empty
from tasks.features import PageFeatures, extract_page_features
from tasks.orientation import upright_size, with_engine_rotation
from tasks.parallel import cpu_workers, map_page_chunks
from tasks.routing import RouteDecision, route_page
from tasks.split import SourcePage, SplitDocument, open_document
from tasks.staging import StagedImage, stage
from tasks.token_stats import token_stat_fields
from tasks.validate import Validation, next_attempt, validate_result

logger = logging.getLogger(__name__)

BLANK_ENGINE = "blank"


@dataclass
class PagePlan:
    """A routed page: what the router decided and why, before any OCR."""

    page_no: int
    width: float
    height: float
    features: dict[str, Any]
    decision: RouteDecision | None  # None: the page could not be read (`error` says why)
    has_text_layer: bool
    error: str | None = None


def route_source_page(page: SourcePage, settings: Settings) -> tuple[PageFeatures, RouteDecision]:
    """A page's features and its route under the run's settings."""
    features = extract_page_features(page.fitz_page)
    decision = route_page(
        features,
        page.width,
        page.height,
        policy=settings.routing_policy,
        precision_target=settings.precision_target,
        render_dpi=page.render_size(settings.render_dpi).dpi,
        mode_override=settings.mode_override,
        engine=engine_capabilities(settings),
    )
    return features, decision


def plan_pages(path: Path, settings: Settings, page_numbers: list[int]) -> list[PagePlan]:
    """Features and a route for each listed page (1-based numbers, ascending), spread over
    the CPU workers."""
    return map_page_chunks(plan_page_chunk, path, settings, page_numbers)


def plan_page_chunk(path: Path, settings: Settings, page_numbers: list[int]) -> list[PagePlan]:
    """`plan_pages` for some pages, in this process."""
    with open_document(path, settings) as document:
        return [plan_page(page, settings) for page in listed_pages(document, page_numbers)]


def plan_page(page: SourcePage, settings: Settings) -> PagePlan:
    """A page's features and route, or why it cannot be read."""
    try:
        features, decision = route_source_page(page, settings)
    except (PermanentInputError, RuntimeError, ValueError) as error:  # MuPDF on a bad page
        logger.warning("page %d cannot be read: %s", page.page_no, error)
        return PagePlan(page.page_no, page.width, page.height, {}, None, False, str(error))
    return PagePlan(
        page_no=page.page_no,
        width=page.width,
        height=page.height,
        features=features.to_dict() | {"orientation": page.orientation.to_dict()},
        decision=decision,
        has_text_layer=features.has_trustworthy_text,
    )


# The wire image (or the file a CPU worker staged it in) and orientation, or why not.
Rendered = tuple[bytes | StagedImage, dict[str, Any]] | UnreadablePage


@dataclass
class PreparedPage:
    """A routed page and what its route needs from the document: when the router sends it to
    OCR, its rendering (`Rendered`); to the text layer, that layer read as a result (or why it
    cannot be). Both are made in the CPU worker that routed the page: PyMuPDF holds the GIL, and
    text layers read in the ingest process stalled the threads that queue and store pages."""

    plan: PagePlan
    rendered: Rendered | None = None
    text_layer: OcrResult | UnreadablePage | None = None


def prepare_page_chunk(
    path: Path, settings: Settings, page_numbers: list[int], stage_in: str | None = None
) -> list[PreparedPage]:
    """Routes some pages and renders those that go to OCR, in one pass over the document (in a
    CPU worker: the document is opened once, and only plans and encoded images travel back,
    the images in files of `stage_in` when it is given, `tasks.staging`)."""
    check_pixels = not engine_capabilities(settings).turns_scans
    prepared: list[PreparedPage] = []
    with open_document(path, settings) as document:
        for page in listed_pages(document, page_numbers):
            plan = plan_page(page, settings)
            route = plan.decision.route if plan.decision is not None else None
            prepared.append(
                PreparedPage(
                    plan,
                    rendered=_render_encoded(page, settings, check_pixels, stage_in)
                    if route == Route.OCR
                    else None,
                    text_layer=_read_text_layer(page) if route == Route.TEXT_LAYER else None,
                )
            )
    return prepared


def prime_cpu_worker(settings: Settings) -> None:
    """Loads in a fresh CPU worker what its first pages need, while the run starts: the
    tokenizer routing counts a text layer's tokens with, and the pixel orientation detector
    where the engine does not turn scans itself (the tokenizer took 1.7-2.2 s on 2 cores, the
    detector about half a second; loaded on a first page, every worker's first chunk waited
    for them as a GPU's batch was filling)."""
    load_tokenizer()
    if not engine_capabilities(settings).turns_scans:
        from models.orientation import shared_detector

        shared_detector()


@dataclass
class PageWork:
    """A page moving through the escalation ladder; every attempt is kept."""

    plan: PagePlan
    mode: Mode | None
    attempts: list[AttemptRecord] = field(default_factory=list)
    status: str = PageStatus.PENDING
    route: str = ""
    error: str | None = None
    infrastructure_error: bool = False
    first_queued: float | None = None  # when the page was first sent to the engine
    request: OcrRequest | None = None  # while queued: its pixels go back with an escalation
    layer_text: str | None = None  # the page's text layer, read once for the cross-check


SettledHandler = Callable[[list[PageRecord]], None]


def recognize_pages(
    path: Path,
    settings: Settings,
    plans: list[PagePlan],
    engine: OcrEngine,
    on_settled: SettledHandler | None = None,
) -> list[PageRecord]:
    """Runs every planned page to a terminal state: accepted, fallen back, or needs_review.

    `on_settled` gets the pages that settled after each step (routing, then each OCR batch),
    so the caller can store them before the whole window is done."""
    works = {plan.page_no: PageWork(plan, plan.decision and plan.decision.mode) for plan in plans}
    reported: set[int] = set()
    with open_document(path, settings) as document:
        listed = [plan.page_no for plan in plans]
        pages = {page.page_no: page for page in listed_pages(document, listed)}
        for work in works.values():
            if work.plan.decision is None:
                fail_page(work, UnreadablePage(work.plan.error or "page cannot be read"))
                continue
            settle_without_ocr(work, pages[work.plan.page_no])
        report_settled(works.values(), reported, on_settled)
        while pending := [w for w in works.values() if w.status == PageStatus.PENDING]:
            for start in range(0, len(pending), settings.ocr_batch_size):
                batch = pending[start : start + settings.ocr_batch_size]
                _run_batch(path, batch, pages, engine, settings)
                report_settled(works.values(), reported, on_settled)
    return [to_record(work) for work in works.values()]


def settle_without_ocr(
    work: PageWork, page: SourcePage, text_layer: OcrResult | UnreadablePage | None = None
) -> None:
    """Blank and text-layer pages are settled by their route alone; a text layer a CPU worker
    read already (`PreparedPage.text_layer`) is not read again."""
    work.route = work.plan.decision.route
    try:
        if work.route == Route.BLANK:
            _accept(work, _blank_result(work.plan.page_no), route=Route.BLANK)
        elif work.route == Route.TEXT_LAYER:
            result = text_layer if text_layer is not None else page.text_layer_result()
            if isinstance(result, UnreadablePage):
                raise result
            _accept(work, result, route=Route.TEXT_LAYER)
    except (PermanentInputError, RuntimeError, ValueError) as error:
        fail_page(work, error)


def _read_text_layer(page: SourcePage) -> OcrResult | UnreadablePage:
    """The page's text layer as a result, or why it cannot be read (as an `UnreadablePage`,
    which travels back from a CPU worker whatever MuPDF raised)."""
    try:
        return page.text_layer_result()
    except (PermanentInputError, RuntimeError, ValueError) as error:
        return UnreadablePage(str(error))


def report_settled(
    works: Iterable[PageWork], reported: set[int], on_settled: SettledHandler | None
) -> list[PageWork]:
    """Hands the pages settled since the last call to `on_settled`; returns them."""
    settled = [
        w for w in works if w.status != PageStatus.PENDING and w.plan.page_no not in reported
    ]
    reported.update(w.plan.page_no for w in settled)
    if settled and on_settled is not None:
        on_settled([to_record(work) for work in settled])
    return settled


def listed_pages(document: SplitDocument, page_numbers: list[int]) -> Iterator[SourcePage]:
    """The listed pages (ascending) of one window, skipping the finished ones in between."""
    wanted = set(page_numbers)
    for page in document.iter_pages(start=min(wanted), end=max(wanted)):
        if page.page_no in wanted:
            yield page


def render_page_chunk(path: Path, settings: Settings, page_numbers: list[int]) -> list[Rendered]:
    """Pages rendered upright and encoded in the GPU queue's lossless format (in a CPU worker
    process: only bytes travel back) with their orientation, or why a page cannot be rendered."""
    check_pixels = not engine_capabilities(settings).turns_scans
    with open_document(path, settings) as document:
        return [
            _render_encoded(page, settings, check_pixels)
            for page in listed_pages(document, page_numbers)
        ]


def _render_encoded(
    page: SourcePage, settings: Settings, check_pixels: bool, stage_in: str | None = None
) -> Rendered:
    try:
        image = page.render(settings.render_dpi, check_pixels=check_pixels)
    except UnreadablePage as error:
        return error
    return stage(encode_image(image), stage_in), page.orientation.to_dict()


def _render(
    path: Path, batch: list[PageWork], pages: dict[int, SourcePage], settings: Settings
) -> list[tuple[Image.Image, bytes | None, dict[str, Any]] | PermanentInputError]:
    """Each page's upright image, its queue encoding when CPU workers rendered it, and its
    orientation. Scans are turned by their pixels here for engines that do not turn them
    themselves (DeepSeek-OCR); RapidOCR does it while it reads."""
    if cpu_workers(settings) <= 1:
        check_pixels = not engine_capabilities(settings).turns_scans
        images: list[tuple[Image.Image, bytes | None, dict[str, Any]] | PermanentInputError] = []
        for work in batch:
            page = pages[work.plan.page_no]
            try:
                image = page.render(settings.render_dpi, check_pixels=check_pixels)
                images.append((image, None, page.orientation.to_dict()))
            except PermanentInputError as error:
                images.append(error)
        return images
    numbers = [work.plan.page_no for work in batch]
    encoded = map_page_chunks(render_page_chunk, path, settings, numbers)
    # Image.open is lazy: an engine that only forwards the encoded bytes never decodes them.
    return [
        e if isinstance(e, Exception) else (Image.open(io.BytesIO(e[0])), e[0], e[1])
        for e in encoded
    ]


def _run_batch(
    path: Path,
    batch: list[PageWork],
    pages: dict[int, SourcePage],
    engine: OcrEngine,
    settings: Settings,
) -> None:
    works: dict[str, PageWork] = {}
    requests: list[OcrRequest] = []
    for work, rendered in zip(batch, _render(path, batch, pages, settings), strict=True):
        if isinstance(rendered, Exception):
            fail_page(work, rendered)
            continue
        image, wire_image, orientation = rendered
        request = ocr_request(work, image, wire_image, orientation, settings)
        works[request.key] = work
        requests.append(request)

    def finished(request: OcrRequest, outcome: OcrResult | Exception) -> None:
        work = works[request.key]
        take_outcome(work, outcome, pages[work.plan.page_no], engine)

    recognize_isolating_failures(engine, requests, finished)


def ocr_request(
    work: PageWork,
    image: Image.Image,
    wire_image: bytes | None,
    orientation: dict[str, Any],
    settings: Settings,
) -> OcrRequest:
    """The engine's request for a rendered page in its current mode."""
    work.plan.features["orientation"] = orientation
    # Rendered upright: boxes come back in the upright page's points, whether /Rotate, the
    # text layer or the pixels (found in a CPU worker) turned it.
    width, height = upright_size(work.plan.width, work.plan.height, orientation["angle"])
    # A page's escalations keep its place in a shared queue: pages sent earlier go first,
    # so a document's early pages are not held up behind later ones.
    work.first_queued = work.first_queued or time.time()
    return OcrRequest(
        key=str(work.plan.page_no),
        image=image,
        wire_image=wire_image,
        priority=work.first_queued,
        mode=work.mode,
        page_width=width,
        page_height=height,
        estimated_text_tokens=work.plan.decision.est_text_tokens,
        max_new_tokens=settings.max_new_tokens,
    )


def take_outcome(
    work: PageWork, outcome: OcrResult | Exception, page: SourcePage, engine: OcrEngine
) -> None:
    """An engine's answer for a page: a bad page fails, an engine error postpones it, a
    reading is judged (accepted, escalated to the next mode, or fallen back)."""
    if isinstance(outcome, PermanentInputError):
        fail_page(work, outcome)
    elif isinstance(outcome, Exception):
        postpone(work, outcome, engine)
    else:
        judge(work, outcome, page)


def fail_page(work: PageWork, error: Exception) -> None:
    """The page itself is bad: failed for good, the rest of the document goes on."""
    logger.warning("page %d failed: %s", work.plan.page_no, error)
    work.status = PageStatus.FAILED
    work.error = str(error)


def postpone(work: PageWork, error: Exception, engine: OcrEngine) -> None:
    """The engine raised: not the page's verdict. The attempt is kept and the page retried."""
    work.infrastructure_error = is_infrastructure(error)
    if work.infrastructure_error:
        logger.warning("page %d postponed: %s", work.plan.page_no, error)
    else:
        logger.error("OCR raised on page %d", work.plan.page_no, exc_info=error)
    work.status = PageStatus.RETRYING
    work.error = f"{engine.name}: {type(error).__name__}: {error}"
    work.attempts.append(
        AttemptRecord(
            result_fields={
                "route": Route.OCR,
                "mode": work.mode.value if work.mode else None,
                "engine": engine.name,
                "model_revision": engine.model_revision,
                "markdown": "",
                "blocks": [],
                "raw_output": "",
                "finish_reason": ERROR_FINISH,
                "accepted": False,
                "rejection_reason": work.error,
            },
            token_fields=None,
        )
    )


def judge(work: PageWork, result: OcrResult, page: SourcePage) -> None:
    verdict = _verdict(work, result, page)
    if verdict.accepted:
        _accept(work, result, route=Route.OCR)
        return
    rejected = _attempt(work, result, route=Route.OCR, accepted=False, reason=verdict.reason)
    work.attempts.append(rejected)
    # An engine without modes (CPU OCR) reports mode None: the ladder goes straight to fallback.
    step = next_attempt(work.plan.decision, result.mode, work.plan.has_text_layer)
    if isinstance(step, Mode):
        work.mode = step
        return
    fallback = page.text_layer_result() if step == Route.TEXT_LAYER else None
    if fallback is not None and not is_near_empty(fallback.markdown):
        _accept(work, fallback, route=Route.TEXT_LAYER)
        work.error = f"OCR rejected ({verdict.reason}); fell back to the text layer"
    else:
        work.status = PageStatus.NEEDS_REVIEW
        work.error = f"OCR rejected on every rung: {verdict.reason}"


def _verdict(work: PageWork, result: OcrResult, page: SourcePage) -> Validation:
    """A reading is accepted when it is not empty while the page has ink (every OCR-routed
    page has), passes validation, and holds the text layer's scripts and most of its words."""
    if is_near_empty(result.markdown):
        return Validation(
            False,
            f"near-empty output ({content_chars(result.markdown)} letters or digits) on a page "
            f"with ink ({work.plan.decision.est_text_tokens} text tokens estimated)",
        )
    verdict = validate_result(result, work.plan.decision)
    if not verdict.accepted or not work.plan.has_text_layer:
        return verdict
    if work.layer_text is None:
        work.layer_text = page.fitz_page.get_text()
    check = cross_check(result.markdown, work.layer_text)
    if check.accepted:
        return Validation(True)
    return Validation(False, f"disagrees with the text layer: {check.summary()}")


def _accept(work: PageWork, result: OcrResult, *, route: str) -> None:
    # A turn the engine made (RapidOCR reads a scan turned in its pixels) joins the planned one.
    orientation = with_engine_rotation(work.plan.features.get("orientation"), result.raw_output)
    if orientation is not None:
        work.plan.features["orientation"] = orientation
    work.attempts.append(_attempt(work, result, route=route, accepted=True, reason=None))
    work.status = PageStatus.DONE
    work.route = route
    # An OCR page keeps the mode it was planned (and escalated) to, also on an engine
    # without modes: its token accounting is priced in that mode.
    work.mode = result.mode or (work.mode if route == Route.OCR else None)


def _attempt(
    work: PageWork, result: OcrResult, *, route: str, accepted: bool, reason: str | None
) -> AttemptRecord:
    result_fields = {
        "route": route,
        "mode": result.mode.value if result.mode else None,
        "engine": result.engine,
        "model_revision": result.model_revision,
        "markdown": result.markdown,
        "blocks": [_block_dict(block) for block in result.blocks],
        "raw_output": result.raw_output,
        "finish_reason": result.finish_reason.value,
        "accepted": accepted,
        "rejection_reason": reason,
    }
    planned = work.mode if route == Route.OCR else None
    token_fields = token_stat_fields(
        result,
        route=route,
        planned_mode=planned,
        planned_vision_tokens=(work.plan.decision.vision_tokens_in(planned) if planned else 0),
    )
    return AttemptRecord(result_fields=result_fields, token_fields=token_fields)


def _block_dict(block) -> dict[str, Any]:
    return {
        "label": block.label,
        "text": block.text,
        "boxes_bins": block.boxes_bins,
        "boxes_page": block.boxes_page,
    }


def _blank_result(page_no: int) -> OcrResult:
    return OcrResult(
        key=str(page_no),
        markdown="",
        blocks=[],
        raw_output="",
        finish_reason=FinishReason.EOS,
        engine=BLANK_ENGINE,
        model_revision="-",
    )


def to_record(work: PageWork) -> PageRecord:
    decision = work.plan.decision
    return PageRecord(
        page_no=work.plan.page_no,
        width=work.plan.width,
        height=work.plan.height,
        fields={
            "route": work.route or None,
            "mode": work.mode.value if work.mode else None,
            "route_reason": decision.reason if decision else None,
            "features": work.plan.features,
            "est_text_tokens": decision.est_text_tokens if decision else None,
            "vision_tokens": decision.vision_tokens if decision else None,
            "expected_compression": decision.expected_compression if decision else None,
            "expected_precision": decision.expected_precision if decision else None,
            "status": work.status,
            "error": work.error,
        },
        attempts=work.attempts,
        infrastructure_error=work.infrastructure_error,
    )
