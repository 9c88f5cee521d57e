"""Routing for a DeepSeek-OCR 2 engine: its budgets (256-token global view plus 144 per local
crop, the Mode ladder capping the crops), the cheapest that keeps the precision target."""

from __future__ import annotations

import pytest

from bench.routing_corpus import born_digital, scan_of
from infra.settings import RoutingPolicy
from infra.vocabulary import Mode, Route
from models.capabilities import DEEPSEEK_OCR, DEEPSEEK_OCR_2
from models.deepseek_ocr2 import geometry
from tasks.features import extract_page_features
from tasks.routing import RouteDecision, route_page
from tasks.validate import next_attempt

A4_AT_144_DPI = (1191, 1684)


def _route(page, engine=DEEPSEEK_OCR_2, **options):
    features = extract_page_features(page)
    return route_page(features, page.rect.width, page.rect.height, engine=engine, **options)


def test_ocr2_budgets_of_an_a4_page():
    # Tiny: the global view alone; caps 2-5 all give the 1x2 grid; Gundam the official 2x3.
    tokens = [DEEPSEEK_OCR_2.vision_tokens(mode, *A4_AT_144_DPI) for mode in Mode]
    assert tokens == [257, 545, 545, 545, 1121]
    assert [DEEPSEEK_OCR_2.crops(mode, *A4_AT_144_DPI) for mode in Mode] == [0, 2, 2, 2, 6]
    assert DEEPSEEK_OCR_2.view_canvas(Mode.GUNDAM, *A4_AT_144_DPI) == (2 * 768, 3 * 768)
    assert DEEPSEEK_OCR_2.view_canvas(Mode.TINY, *A4_AT_144_DPI) == (1024, 1024)
    # A square page: 2 crops under caps 2-3, a 2x2 grid from 4 on.
    assert [geometry.mode_crops(mode, 1600, 1600) for mode in Mode] == [0, 2, 2, 4, 4]
    assert geometry.count_placeholders(Mode.TINY, 700, 500) == 257  # small: never cropped


def test_sparse_page_gets_the_global_view_alone():
    slide = born_digital("slide", "latin", 1)
    decision = _route(scan_of(slide)[0])
    assert decision.route == Route.OCR and decision.mode == Mode.TINY
    assert decision.vision_tokens == 257 and decision.family == "deepseek-ocr-2"
    assert decision.reason.startswith("[deepseek-ocr-2] tiny (global view only)")


def test_report_page_takes_the_cheapest_ocr2_budget_meeting_the_target():
    page = scan_of(born_digital("report", "latin", 1))[0]
    v1, ocr2 = _route(page, engine=DEEPSEEK_OCR), _route(page)
    assert v1.mode == Mode.SMALL and v1.vision_tokens == 100  # v1's 640-px view
    assert ocr2.mode == Mode.TINY and ocr2.vision_tokens == 257  # OCR-2 has nothing smaller
    assert ocr2.expected_precision >= 0.95
    stricter = _route(page, precision_target=0.99)  # 257 tokens no longer enough: crops
    assert stricter.vision_tokens > 257
    width, height = stricter.image_size
    assert stricter.vision_tokens == geometry.count_placeholders(stricter.mode, width, height)
    assert stricter.mode == min(  # the cheapest rung with that budget, not a same-cost later one
        (
            m
            for m in Mode
            if DEEPSEEK_OCR_2.vision_tokens(m, width, height) == stricter.vision_tokens
        ),
        key=list(Mode).index,
    )


@pytest.mark.parametrize("kind", ["newspaper", "table"])
def test_complex_layouts_get_every_crop(kind):
    decision = _route(scan_of(born_digital(kind, "latin", 1))[0])
    assert decision.mode == Mode.GUNDAM
    assert decision.vision_tokens == geometry.count_placeholders(Mode.GUNDAM, *decision.image_size)
    assert "global view + " in decision.reason


def test_forced_mode_is_priced_with_ocr2_budgets():
    page = born_digital("report", "latin", 1)[0]
    decision = _route(page, policy=RoutingPolicy.ALWAYS_OCR, mode_override=Mode.BASE)
    assert decision.vision_tokens == geometry.count_placeholders(Mode.BASE, *decision.image_size)


def test_escalation_skips_rungs_that_give_an_ocr2_page_no_more_vision_tokens():
    decision = RouteDecision(
        route=Route.OCR, mode=Mode.SMALL, est_text_tokens=900, vision_tokens=545,
        expected_compression=900 / 545, expected_precision=0.98, reason="test",
        image_size=A4_AT_144_DPI, family="deepseek-ocr-2",
    )  # fmt: skip
    assert next_attempt(decision, Mode.TINY, has_text_layer=False) == Mode.SMALL
    assert next_attempt(decision, Mode.SMALL, has_text_layer=False) == Mode.GUNDAM  # not Base
    assert next_attempt(decision, Mode.GUNDAM, has_text_layer=True) == "text-layer"
