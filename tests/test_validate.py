"""Validation of OCR results and the escalation ladder (a scripted engine stands in for the GPU)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from bench.corpus_text import ENGLISH_SENTENCES
from infra.vocabulary import Mode, Route
from models.engine import FinishReason, OcrRequest, OcrResult
from tasks.routing import RouteDecision
from tasks.validate import find_tail_loop, next_attempt, validate_result

A4_AT_144_DPI = (1191, 1684)
PAGE_TEXT = " ".join(ENGLISH_SENTENCES[:12])


def _decision(est_text_tokens: int = 150, image_size=A4_AT_144_DPI) -> RouteDecision:
    return RouteDecision(
        route=Route.OCR, mode=Mode.TINY, est_text_tokens=est_text_tokens, vision_tokens=64,
        expected_compression=est_text_tokens / 64, expected_precision=0.98, reason="test",
        image_size=image_size,
    )  # fmt: skip


def _result(markdown: str, finish: FinishReason = FinishReason.EOS, mode=Mode.TINY) -> OcrResult:
    return OcrResult(
        key="1", markdown=markdown, blocks=[], raw_output=markdown, finish_reason=finish,
        engine="scripted", model_revision="test", mode=mode, output_tokens=8192,
    )  # fmt: skip


@dataclass
class ScriptedEngine:
    """A GPU test double: fails in the listed modes ("loop", "truncate", "short"), reads the
    page correctly in any other."""

    failures: dict[Mode, str]
    name: str = "scripted"
    model_revision: str = "test"
    seen_modes: list[Mode | None] = field(default_factory=list)

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]:
        results = []
        for request in requests:
            self.seen_modes.append(request.mode)
            failure = self.failures.get(request.mode)
            text, finish = PAGE_TEXT, FinishReason.EOS
            if failure == "loop":
                text = PAGE_TEXT[:200] + " the same line again and again." * 60
            elif failure == "truncate":
                finish = FinishReason.LENGTH
            elif failure == "short":
                text = "Water damage."
            results.append(_result(text, finish, request.mode))
        return results


def _run_ladder(engine: ScriptedEngine, decision: RouteDecision, has_text_layer: bool):
    """What the OCR batch task does for one page: validate, step up, until terminal."""
    mode, rejections = decision.mode, []
    while True:
        request = OcrRequest("1", image=None, mode=mode, page_width=595, page_height=842)
        result = engine.recognize([request])[0]
        verdict = validate_result(result, decision)
        if verdict.accepted:
            return mode, rejections
        rejections.append(verdict.reason)
        step = next_attempt(decision, mode, has_text_layer)
        if not isinstance(step, Mode):
            return step, rejections
        mode = step


def test_good_output_is_accepted():
    assert validate_result(_result(PAGE_TEXT), _decision()).accepted


def test_token_cap_is_rejected():
    verdict = validate_result(_result(PAGE_TEXT, FinishReason.LENGTH), _decision())
    assert not verdict.accepted and "token cap" in verdict.reason


def test_repeating_tail_is_a_loop():
    verdict = validate_result(_result(PAGE_TEXT + "Total: 12\n" * 30), _decision())
    assert not verdict.accepted and verdict.reason.startswith("loops")


def test_long_repeated_passage_is_a_loop():
    passage = ENGLISH_SENTENCES[36] + " " + ENGLISH_SENTENCES[37]  # ~35 tokens
    looping = PAGE_TEXT + " ".join(f"{passage}({i})" for i in range(8))
    verdict = validate_result(_result(looping), _decision())
    assert not verdict.accepted and "occurs" in verdict.reason


def test_empty_table_rows_are_not_a_loop():
    rows = "<tr><td></td><td></td><td></td></tr>" * 30
    markdown = f"{PAGE_TEXT}<table><tr><td>Name</td><td>Date</td></tr>{rows}</table>"
    assert validate_result(_result(markdown), _decision()).accepted


def test_far_less_text_than_estimated_is_rejected():
    verdict = validate_result(_result("Water damage."), _decision(est_text_tokens=400))
    assert not verdict.accepted and "far less text" in verdict.reason
    # sparse pages are not judged by length
    assert validate_result(_result("Water damage."), _decision(est_text_tokens=20)).accepted


def test_find_tail_loop_reports_period_and_repeats():
    assert find_tail_loop(list(range(50)) + [7, 8, 9, 10] * 12) == (4, 12)
    assert find_tail_loop(list(range(200))) is None


@pytest.mark.parametrize("failure", ["loop", "truncate", "short"])
def test_failing_pages_climb_the_full_ladder_then_fall_back(failure):
    engine = ScriptedEngine({mode: failure for mode in Mode})
    outcome, rejections = _run_ladder(engine, _decision(), has_text_layer=True)
    assert engine.seen_modes == list(Mode)
    assert outcome == "text-layer"
    assert len(rejections) == len(Mode)


def test_page_without_text_layer_needs_review_after_the_top_rung():
    engine = ScriptedEngine({mode: "loop" for mode in Mode})
    outcome, rejections = _run_ladder(engine, _decision(), has_text_layer=False)
    assert outcome == "needs_review"
    assert all(reason.startswith("loops") for reason in rejections)


def test_escalation_stops_at_the_first_mode_that_reads_the_page():
    engine = ScriptedEngine({Mode.TINY: "truncate", Mode.SMALL: "loop"})
    outcome, rejections = _run_ladder(engine, _decision(), has_text_layer=False)
    assert outcome == Mode.BASE
    assert engine.seen_modes == [Mode.TINY, Mode.SMALL, Mode.BASE]
    assert "token cap" in rejections[0] and rejections[1].startswith("loops")


def test_ladder_skips_modes_that_add_no_vision_tokens():
    # Both sides <= 640 px: Gundam has no tiles, so it is Base again and is skipped.
    small_image = _decision(image_size=(600, 400))
    assert next_attempt(small_image, Mode.LARGE, has_text_layer=False) == "needs_review"
    assert next_attempt(small_image, Mode.BASE, has_text_layer=True) == Mode.LARGE


def test_engine_without_modes_goes_straight_to_fallback():
    assert next_attempt(_decision(), None, has_text_layer=True) == "text-layer"
    assert next_attempt(_decision(), None, has_text_layer=False) == "needs_review"
