"""Cross-check before accepting (issue 12, item 2): OCR that lost a script the text layer has,
or most of its words, climbs a mode, then falls back to the layer; OCR that read nothing on a
page with ink is never `done`."""

from __future__ import annotations

from pathlib import Path

import pymupdf
import pytest

from infra.settings import RoutingPolicy, Settings
from infra.vocabulary import Mode
from models.engine import FinishReason, OcrRequest, OcrResult
from models.rapidocr_engine import RapidOcrEngine
from tasks.crosscheck import cross_check, is_near_empty
from tasks.pages import plan_pages, recognize_pages
from tests.born_digital import ARABIC_WORD, write_pdf
from tests.conftest import SAMPLES_DIR

SCAN = SAMPLES_DIR / "scan.pdf"  # image only, no text layer
REPORT = SAMPLES_DIR / "report.pdf"  # born digital
OTHER_TEXT = "Minutes of the harbour board: the ferry timetable changes on the first of May. " * 4


class ModeScriptedEngine:
    """A DeepSeek-like engine whose answer per mode is scripted: a text, or `layer` for the
    page's own text layer (what a faithful reading returns)."""

    name = "scripted"
    model_revision = "script-1"

    def __init__(self, script: dict[Mode | None, str], layer: dict[str, str]) -> None:
        self.script, self.layer = script, layer
        self.calls: list[Mode | None] = []

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]:
        results = []
        for request in requests:
            self.calls.append(request.mode)
            text = self.script.get(request.mode, "layer")
            text = self.layer.get(request.key, "") if text == "layer" else text
            results.append(
                OcrResult(key=request.key, markdown=text, blocks=[], raw_output=text,
                          finish_reason=FinishReason.EOS, engine=self.name,
                          model_revision=self.model_revision, mode=request.mode,
                          vision_tokens=100, valid_vision_tokens=100, output_tokens=50)
            )  # fmt: skip
        return results


def _layers(path: Path) -> dict[str, str]:
    with pymupdf.open(path) as document:
        return {str(page.number + 1): page.get_text() for page in document}


def test_cross_check_measures_words_characters_and_scripts() -> None:
    layer = f"habibi {ARABIC_WORD} and the committee agreed that every volume was catalogued"
    lost = cross_check("habibi .** and the committee agreed that every volume was catalogued",
                       layer)  # fmt: skip
    assert lost.lost_scripts == ("arabic",) and not lost.accepted
    assert lost.word_coverage == pytest.approx(10 / 11)
    assert "lost arabic script" in lost.summary() and "91%" in lost.summary()
    kept = cross_check(layer.upper(), layer)
    assert kept.accepted and kept.word_coverage == 1.0 and kept.char_coverage == 1.0
    other = cross_check(OTHER_TEXT, layer)
    assert not other.accepted and other.word_coverage < 0.5
    assert is_near_empty("()") and is_near_empty("") and is_near_empty(" .** ")
    assert not is_near_empty("Total 42")


def test_ocr_that_lost_the_arabic_word_falls_back_to_the_text_layer(tmp_path: Path) -> None:
    """RapidOCR reads `habibi` and drops the Arabic word: the layer is stored, not the loss."""
    pdf = write_pdf(tmp_path / "arabic.pdf", ["arabic"])
    settings = Settings(database_url="sqlite://", routing_policy=RoutingPolicy.ALWAYS_OCR)
    [record] = recognize_pages(pdf, settings, plan_pages(pdf, settings, [1]), RapidOcrEngine())

    rejected, accepted = (a.result_fields for a in record.attempts)
    assert not rejected["accepted"] and "lost arabic script" in rejected["rejection_reason"]
    assert "word coverage" in rejected["rejection_reason"]
    assert accepted["accepted"] and accepted["route"] == "text-layer"
    assert record.fields["status"] == "done" and record.fields["route"] == "text-layer"
    assert "fell back to the text layer" in record.fields["error"]


def test_reading_most_words_wrong_is_retried_one_mode_up() -> None:
    settings = Settings(database_url="sqlite://", routing_policy=RoutingPolicy.ALWAYS_OCR)
    plans = plan_pages(REPORT, settings, [1])
    first = plans[0].decision.mode
    engine = ModeScriptedEngine({first: OTHER_TEXT}, _layers(REPORT))
    [record] = recognize_pages(REPORT, settings, plans, engine)

    assert engine.calls == [first, first.next_up()]
    rejected, accepted = (a.result_fields for a in record.attempts)
    assert "disagrees with the text layer: word coverage" in rejected["rejection_reason"]
    assert accepted["accepted"] and accepted["route"] == "ocr"
    assert record.fields["status"] == "done" and record.fields["mode"] == first.next_up().value


@pytest.mark.parametrize("empty", ["", "()", " .** "])
def test_empty_reading_of_a_page_with_ink_is_never_done(empty: str) -> None:
    settings = Settings(database_url="sqlite://")
    engine = ModeScriptedEngine(dict.fromkeys([*Mode, None], empty), {})
    [record] = recognize_pages(SCAN, settings, plan_pages(SCAN, settings, [1]), engine)

    assert record.fields["status"] == "needs_review"
    assert "near-empty output" in record.fields["error"]
    assert len(engine.calls) >= 2  # climbed the ladder before giving up
    assert not any(a.result_fields["accepted"] for a in record.attempts)


def test_empty_reading_without_modes_falls_back_to_a_trustworthy_layer() -> None:
    settings = Settings(database_url="sqlite://", routing_policy=RoutingPolicy.ALWAYS_OCR)

    class ModelessEngine(ModeScriptedEngine):
        def recognize(self, requests):
            return [
                OcrResult(key=r.key, markdown="()", blocks=[], raw_output="()",
                          finish_reason=FinishReason.EOS, engine="modeless",
                          model_revision="1")
                for r in requests
            ]  # fmt: skip

    [record] = recognize_pages(
        REPORT, settings, plan_pages(REPORT, settings, [1]), ModelessEngine({}, {})
    )
    assert record.fields["status"] == "done" and record.fields["route"] == "text-layer"
    assert "near-empty" in record.fields["error"]


def test_cjk_is_compared_character_by_character() -> None:
    layer = "档案馆在春天收到了四十二箱教区登记册，\n每一卷都在夏季休会前编目。"
    check = cross_check(layer.replace("\n", "").replace("，", "\n"), layer)  # lines split anew
    assert check.accepted and check.word_coverage == 1.0
    assert not cross_check("档案馆", layer).accepted
