"""Token statistics for every page on every route (issue 12, item 6): a default (CPU) install
stores a token row for every accepted result, a mode for every OCR page, and `stats` and
`show` report them per page and in totals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from infra.db.queries import document_view
from infra.db.session import session_scope
from infra.db.stats import collect_stats
from infra.settings import Settings
from models.deepseek_ocr import tokenizer as deepseek_tokenizer
from models.engine import FinishReason, OcrRequest, OcrResult
from models.rapidocr_engine import RapidOcrEngine
from tasks import token_stats
from tasks.pages import plan_pages, recognize_pages
from tests.born_digital import SCAN_TEXT, write_pdf
from tests.stored import store_document

KINDS = ["blank", "german-prose", "scan"]


class GeneratingEngine:
    """A DeepSeek-like engine that reports the tokens it generated and spent."""

    name = "generating"
    model_revision = "1"

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]:
        return [
            OcrResult(key=r.key, markdown=SCAN_TEXT, blocks=[], raw_output=SCAN_TEXT,
                      finish_reason=FinishReason.EOS, engine=self.name, model_revision="1",
                      mode=r.mode, vision_tokens=273, valid_vision_tokens=256,
                      prompt_tokens=290, output_tokens=123)
            for r in requests
        ]  # fmt: skip


def _ingest(pdf: Path, url: str, engine) -> int:
    settings = Settings(database_url=url)
    plans = plan_pages(pdf, settings, list(range(1, len(KINDS) + 1)))
    records = recognize_pages(pdf, settings, plans, engine)
    return store_document(pdf, url, records)


def test_every_route_has_token_stats_on_the_cpu_engine(tmp_path: Path, postgres_url: str):
    pdf = write_pdf(tmp_path / "mixed.pdf", KINDS)
    document_id = _ingest(pdf, postgres_url, RapidOcrEngine())

    with session_scope(postgres_url) as session:
        view = document_view(session=session, document_id=document_id)
        stats = collect_stats(session=session, document_ids=[document_id])
    blank, layer, scan = (page["tokens"] for page in view["pages"])
    assert [blank["route"], layer["route"], scan["route"]] == ["blank", "text-layer", "ocr"]
    assert view["pages"][2]["mode"] is not None  # the planned mode, though RapidOCR has none
    assert scan["mode"] == view["pages"][2]["mode"] and scan["planned_vision_tokens"] > 0
    assert scan["vision_tokens_spent"] == 0  # RapidOCR spends no vision tokens
    assert scan["output_tokens"] > 50 and scan["output_tokens_source"] == "counted"
    assert layer["output_tokens"] > 50 and layer["output_tokens_source"] == "counted"
    assert blank["output_tokens"] == 0 and blank["planned_vision_tokens"] == 0

    totals = view["tokens"]
    assert totals["output_tokens"] == layer["output_tokens"] + scan["output_tokens"]
    assert set(totals["by_route"]) == {"blank", "text-layer", "ocr"}

    assert stats["pages"]["by_mode"] == {scan["mode"]: 1}  # no `None` for non-OCR pages
    accepted = stats["token_totals"]
    assert accepted["results"] == 3  # one row per accepted result, every route
    assert accepted["by_route"]["ocr"]["planned_vision_tokens"] == scan["planned_vision_tokens"]
    assert accepted["output_tokens_by_source"] == {"counted": totals["output_tokens"]}
    assert accepted["by_planned_mode"][scan["mode"]]["results"] == 1
    assert stats["tokens"]["accepted_output_tokens"] == totals["output_tokens"]
    assert [row["route"] for row in stats["by_page"]] == ["blank", "text-layer", "ocr"]


def test_generated_tokens_are_kept_and_marked(tmp_path: Path, postgres_url: str):
    pdf = write_pdf(tmp_path / "mixed.pdf", KINDS)
    document_id = _ingest(pdf, postgres_url, GeneratingEngine())

    with session_scope(postgres_url) as session:
        scan = document_view(session=session, document_id=document_id)["pages"][2]["tokens"]
        stats = collect_stats(session=session)
    assert scan["output_tokens"] == 123 and scan["output_tokens_source"] == "generated"
    assert scan["vision_tokens_spent"] == 273
    assert stats["token_totals"]["output_tokens_by_source"]["generated"] == 123
    assert "by_page" not in stats  # every document: totals only


def test_output_tokens_are_estimated_and_marked_without_a_tokenizer():
    text = "The archive received forty boxes."
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "deepseek_tokenizer", None)  # the package is missing
        token_stats._tokenizer.cache_clear()
        deepseek_tokenizer._load.cache_clear()
        try:
            count, source = token_stats.count_output_tokens(text)
        finally:
            token_stats._tokenizer.cache_clear()
            deepseek_tokenizer._load.cache_clear()
    assert source == "estimated" and count == pytest.approx(7, abs=2)
    assert token_stats.count_output_tokens(text) == (6, "counted")
