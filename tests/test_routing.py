"""Routing: blank / text-layer / the cheapest OCR mode that keeps precision."""

from __future__ import annotations

import itertools

import pymupdf
import pytest

from bench.routing_corpus import born_digital, scan_of
from infra.settings import RoutingPolicy
from infra.vocabulary import Mode, Route
from models.capabilities import DEEPSEEK_OCR
from tasks.estimate import estimate_text_tokens
from tasks.features import extract_page_features
from tasks.precision import expected_precision, max_compression
from tasks.routing import route_page

ALWAYS_OCR = RoutingPolicy.ALWAYS_OCR


def _route(page: pymupdf.Page, **options):
    # These pin DeepSeek-OCR's routing; the CPU engine's is in test_routing_engine_aware.py.
    options.setdefault("engine", DEEPSEEK_OCR)
    return route_page(extract_page_features(page), page.rect.width, page.rect.height, **options)


def test_precision_model_follows_the_paper():
    # Fox headline: ~97% below 10x, ~90% at 10-12x, ~60% at 20x; never rising with compression.
    assert expected_precision(8.0) == pytest.approx(0.97, abs=0.01)
    assert 0.88 <= expected_precision(11.5) <= 0.93
    assert expected_precision(19.7) == pytest.approx(0.59, abs=0.01)
    curve = [expected_precision(c / 10) for c in range(10, 300)]
    assert all(a >= b for a, b in itertools.pairwise(curve))
    assert 10.0 < max_compression(0.95) < 11.0


def test_sparse_slide_gets_a_small_mode():
    slide = born_digital("slide", "latin", 1)
    for decision in (_route(slide[0], policy=ALWAYS_OCR), _route(scan_of(slide)[0])):
        assert decision.route == Route.OCR
        assert decision.mode in (Mode.TINY, Mode.SMALL)
        assert decision.vision_tokens <= 100


def test_dense_two_column_page_gets_gundam():
    page = born_digital("two-column", "latin", 1)
    for decision in (_route(page[0], policy=ALWAYS_OCR), _route(scan_of(page)[0])):
        assert decision.mode == Mode.GUNDAM
        assert "two columns" in decision.reason


@pytest.mark.parametrize("kind", ["newspaper", "table"])
def test_newspaper_and_table_pages_get_gundam(kind):
    page = born_digital(kind, "cjk", 1)
    assert _route(page[0]).mode == Mode.GUNDAM  # even with a trustworthy text layer
    assert _route(scan_of(page)[0]).mode == Mode.GUNDAM


def test_report_page_takes_the_cheapest_mode_meeting_the_target():
    decision = _route(scan_of(born_digital("report", "latin", 1))[0])
    assert decision.mode == Mode.SMALL  # ~750 tokens: Tiny would be ~12x, below 95%
    assert decision.expected_precision >= 0.95
    assert decision.expected_compression == pytest.approx(
        decision.est_text_tokens / decision.vision_tokens, abs=0.01
    )
    assert "tiny" in decision.reason  # the rejected cheaper mode is explained
    stricter = _route(scan_of(born_digital("report", "latin", 1))[0], precision_target=0.975)
    assert list(Mode).index(stricter.mode) > list(Mode).index(Mode.SMALL)


def test_small_type_is_not_sent_to_a_mode_where_it_is_illegible():
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_textbox(pymupdf.Rect(72, 72, 523, 200), "Footnote text in small type. " * 8,
                        fontsize=6)  # fmt: skip
    decision = _route(page, policy=ALWAYS_OCR)
    assert decision.mode not in (Mode.TINY, Mode.SMALL)
    assert "px" in decision.reason


def test_blank_page_is_blank_under_every_policy():
    doc = pymupdf.open()
    page = doc.new_page()
    for policy in RoutingPolicy:
        decision = _route(page, policy=policy)
        assert decision.route == Route.BLANK and decision.mode is None
        assert decision.vision_tokens == 0


def test_auto_keeps_a_trustworthy_text_layer_and_always_ocr_does_not():
    page = born_digital("report", "latin", 1)[0]
    auto = _route(page, policy=RoutingPolicy.AUTO)
    assert auto.route == Route.TEXT_LAYER and auto.mode is None and auto.vision_tokens == 0
    assert auto.est_text_tokens > 500
    forced = _route(page, policy=ALWAYS_OCR)
    assert forced.route == Route.OCR and forced.mode is not None
    assert forced.est_text_tokens == auto.est_text_tokens
    assert "always-ocr" in forced.reason


def test_mode_override_forces_every_non_blank_page_into_that_mode():
    slide = born_digital("slide", "latin", 1)[0]
    forced = _route(slide, mode_override=Mode.LARGE)
    assert (forced.route, forced.mode) == (Route.OCR, Mode.LARGE)
    assert forced.vision_tokens > _route(slide, policy=ALWAYS_OCR).vision_tokens
    assert "forced" in forced.reason
    blank = pymupdf.open().new_page()
    assert _route(blank, mode_override=Mode.LARGE).route == Route.BLANK


def test_garbled_text_layer_is_not_used():
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    body = "The archive received forty-two boxes of parish registers in the spring. " * 20
    shifted = "".join(chr((ord(c) - 97 + 5) % 26 + 97) if c.islower() else c for c in body)
    page.insert_textbox(pymupdf.Rect(72, 72, 523, 770), shifted, fontsize=11)
    decision = _route(page, policy=RoutingPolicy.AUTO)
    assert decision.route == Route.OCR
    assert "from pixels" in decision.reason and "vowels" in decision.reason


TEXT_KINDS = ("slide", "letter", "report", "two-column", "newspaper")


@pytest.mark.parametrize("script", ["latin", "cjk"])
def test_pixel_estimate_agrees_with_the_text_layer(script):
    """Within +-35% on at least 80% of born-digital text pages rendered to images."""
    errors = []
    for kind in TEXT_KINDS:
        source = born_digital(kind, script, 2, seed=7)
        for page, scan_page in zip(source, scan_of(source, seed=7), strict=True):
            reference = extract_page_features(page).text_tokens
            estimate = estimate_text_tokens(extract_page_features(scan_page))
            assert estimate.source == "pixels"
            errors.append(abs(estimate.tokens / reference - 1))
    within = sum(error <= 0.35 for error in errors) / len(errors)
    assert within >= 0.8, errors
