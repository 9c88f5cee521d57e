"""Per-window page work as plain functions: route pages, then recognise them with escalation.

A window is opened, worked and closed as a unit, so a 2,000-page document never holds more
than one window of pages (and one OCR batch of rendered images) in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.db.models import PageStatus
from infra.db.repository import AttemptRecord, PageRecord
from infra.settings import Settings
from infra.vocabulary import Mode
from models.engine import (
    FinishReason,
    OcrEngine,
    OcrRequest,
    OcrResult,
    recognize_isolating_failures,
)
from tasks.features import PageFeatures, extract_page_features
from tasks.routing import RouteDecision, route_page
from tasks.split import SourcePage, SplitDocument, open_document
from tasks.validate import next_attempt, validate_result

logger = logging.getLogger(__name__)

BLANK_ENGINE = "blank"


@dataclass
class PagePlan:
    """A routed page: what the router decided and why, before any OCR."""

    page_no: int
    width: float
    height: float
    features: dict[str, Any]
    decision: RouteDecision
    has_text_layer: bool


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
    )
    return features, decision


def plan_pages(path: Path, settings: Settings, page_numbers: list[int]) -> list[PagePlan]:
    """Features and a route for each listed page (1-based numbers, ascending)."""
    plans: list[PagePlan] = []
    with open_document(path, settings) as document:
        for page in _listed_pages(document, page_numbers):
            features, decision = route_source_page(page, settings)
            plans.append(
                PagePlan(
                    page_no=page.page_no,
                    width=page.width,
                    height=page.height,
                    features=features.to_dict(),
                    decision=decision,
                    has_text_layer=features.has_trustworthy_text,
                )
            )
    return plans


@dataclass
class _PageWork:
    """A page moving through the escalation ladder; every attempt is kept."""

    plan: PagePlan
    mode: Mode | None
    attempts: list[AttemptRecord] = field(default_factory=list)
    status: str = PageStatus.PENDING
    route: str = ""
    error: str | None = None


def recognize_pages(
    path: Path, settings: Settings, plans: list[PagePlan], engine: OcrEngine
) -> list[PageRecord]:
    """Runs every planned page to a terminal state: accepted, fallen back, or needs_review."""
    works = {
        plan.page_no: _PageWork(plan, plan.decision.mode, route=plan.decision.route)
        for plan in plans
    }
    with open_document(path, settings) as document:
        listed = [plan.page_no for plan in plans]
        pages = {page.page_no: page for page in _listed_pages(document, listed)}
        for work in works.values():
            if work.route == "blank":
                _accept(work, _blank_result(work.plan.page_no), route="blank")
            elif work.route == "text-layer":
                _accept(work, pages[work.plan.page_no].text_layer_result(), route="text-layer")
        while pending := [w for w in works.values() if w.status == PageStatus.PENDING]:
            for start in range(0, len(pending), settings.ocr_batch_size):
                batch = pending[start : start + settings.ocr_batch_size]
                _run_batch(batch, pages, engine, settings)
    return [_to_record(work) for work in works.values()]


def _listed_pages(document: SplitDocument, page_numbers: list[int]) -> Iterator[SourcePage]:
    """The listed pages (ascending) of one window, skipping the finished ones in between."""
    wanted = set(page_numbers)
    for page in document.iter_pages(start=min(wanted), end=max(wanted)):
        if page.page_no in wanted:
            yield page


def _run_batch(
    batch: list[_PageWork], pages: dict[int, SourcePage], engine: OcrEngine, settings: Settings
) -> None:
    requests = [
        OcrRequest(
            key=str(work.plan.page_no),
            image=pages[work.plan.page_no].render(settings.render_dpi),
            mode=work.mode,
            page_width=work.plan.width,
            page_height=work.plan.height,
            estimated_text_tokens=work.plan.decision.est_text_tokens,
            max_new_tokens=settings.max_new_tokens,
        )
        for work in batch
    ]
    works = {request.key: work for request, work in zip(requests, batch, strict=True)}

    def finished(request: OcrRequest, outcome: OcrResult | Exception) -> None:
        work = works[request.key]
        if isinstance(outcome, Exception):
            logger.error("OCR failed on page %s", work.plan.page_no, exc_info=outcome)
            work.status = PageStatus.FAILED
            work.error = f"{engine.name} failed: {type(outcome).__name__}: {outcome}"
        else:
            _judge(work, outcome, pages[work.plan.page_no])

    recognize_isolating_failures(engine, requests, finished)


def _judge(work: _PageWork, result: OcrResult, page: SourcePage) -> None:
    verdict = validate_result(result, work.plan.decision)
    if verdict.accepted:
        _accept(work, result, route="ocr")
        return
    work.attempts.append(_attempt(result, route="ocr", accepted=False, reason=verdict.reason))
    # An engine without modes (CPU OCR) reports mode None: the ladder goes straight to fallback.
    step = next_attempt(work.plan.decision, result.mode, work.plan.has_text_layer)
    if isinstance(step, Mode):
        work.mode = step
    elif step == "text-layer":
        _accept(work, page.text_layer_result(), route="text-layer")
        work.error = f"OCR rejected ({verdict.reason}); fell back to the text layer"
    else:
        work.status = PageStatus.NEEDS_REVIEW
        work.error = f"OCR rejected on every rung: {verdict.reason}"


def _accept(work: _PageWork, result: OcrResult, *, route: str) -> None:
    work.attempts.append(_attempt(result, route=route, accepted=True, reason=None))
    work.status = PageStatus.DONE
    work.route = route
    work.mode = result.mode


def _attempt(result: OcrResult, *, route: str, accepted: bool, reason: str | None) -> AttemptRecord:
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
    token_fields = None
    if result.vision_tokens is not None or result.output_tokens is not None:
        valid = result.valid_vision_tokens
        token_fields = {
            "vision_tokens": result.vision_tokens,
            "valid_vision_tokens": valid,
            "prompt_tokens": result.prompt_tokens,
            "output_tokens": result.output_tokens,
            "compression_ratio": (result.output_tokens / valid)
            if valid and result.output_tokens is not None
            else None,
            "encode_ms": result.encode_ms,
            "decode_ms": result.decode_ms,
        }
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


def _to_record(work: _PageWork) -> PageRecord:
    decision = work.plan.decision
    return PageRecord(
        page_no=work.plan.page_no,
        width=work.plan.width,
        height=work.plan.height,
        fields={
            "route": work.route,
            "mode": work.mode.value if work.mode else None,
            "route_reason": decision.reason,
            "features": work.plan.features,
            "est_text_tokens": decision.est_text_tokens,
            "vision_tokens": decision.vision_tokens,
            "expected_compression": decision.expected_compression,
            "expected_precision": decision.expected_precision,
            "status": work.status,
            "error": work.error,
        },
        attempts=work.attempts,
    )
