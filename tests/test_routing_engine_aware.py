"""Engine-aware routing: a trustworthy text layer is traded for OCR only when the configured
engine recovers what the layer lacks without losing what it has (issue 12, item 1)."""

from __future__ import annotations

from pathlib import Path

import pymupdf
import pytest

from flows.plan import plan_documents
from infra.settings import Settings
from infra.vocabulary import Route
from models.capabilities import DEEPSEEK_OCR, RAPIDOCR, EngineCapabilities, rapidocr_charset
from models.rapidocr_engine import RapidOcrEngine
from tasks.features import extract_page_features
from tasks.pages import plan_pages, recognize_pages
from tasks.routing import route_page
from tests.born_digital import (
    add_picture,
    arabic_word_page,
    formula_page,
    german_math_page,
    german_prose_page,
    table_page,
    write_pdf,
)


def _route(page: pymupdf.Page, engine: EngineCapabilities):
    features = extract_page_features(page)
    return route_page(features, page.rect.width, page.rect.height, engine=engine)


@pytest.mark.parametrize("make", [german_math_page, formula_page, table_page])
def test_rapidocr_keeps_the_text_layer_of_formula_and_table_pages(make) -> None:
    page = make(pymupdf.open())
    on_cpu = _route(page, RAPIDOCR)
    assert on_cpu.route == Route.TEXT_LAYER
    assert on_cpu.reason.startswith("[rapidocr]")
    assert "cannot represent" in on_cpu.reason
    on_gpu = _route(page, DEEPSEEK_OCR)  # DeepSeek-OCR writes LaTeX and tables: OCR it
    assert on_gpu.route == Route.OCR and on_gpu.mode is not None
    assert on_gpu.reason.startswith("[deepseek-ocr]")


@pytest.mark.parametrize(
    ("make", "lost"),
    [(arabic_word_page, "arabic script"), (german_prose_page, "ß")],
)
def test_layer_is_kept_where_the_engine_would_lose_its_script_or_characters(make, lost) -> None:
    page = add_picture(make(pymupdf.open()))  # text in images: OCR would otherwise win
    on_cpu = _route(page, RAPIDOCR)
    assert on_cpu.route == Route.TEXT_LAYER
    assert "would lose" in on_cpu.reason and lost in on_cpu.reason
    assert _route(page, DEEPSEEK_OCR).route == Route.OCR


def test_rapidocr_alphabet_is_read_from_its_model() -> None:
    charset = rapidocr_charset()
    assert charset is not None and len(charset) > 6000
    assert {"a", "Z", "0", "ü", "中"} <= charset
    assert not {"ß", "€", "∅", "ب"} & charset


def test_routing_and_plan_follow_the_configured_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pdf = write_pdf(tmp_path / "math.pdf", ["german-math"])
    page = pymupdf.open(pdf)[0]
    monkeypatch.delenv("OCRFLOW_MODEL_PATH", raising=False)
    monkeypatch.setenv("OCRFLOW_ENGINE", "rapidocr")
    assert _route(page, RAPIDOCR).route == Route.TEXT_LAYER
    [plan] = plan_documents([str(pdf)], Settings())
    assert plan.pages[0].route == "text-layer" and "[rapidocr]" in plan.pages[0].reason

    monkeypatch.setenv("OCRFLOW_ENGINE", "queue")  # resident DeepSeek-OCR workers
    assert _route(page, DEEPSEEK_OCR).route == Route.OCR
    [plan] = plan_documents([str(pdf)], Settings())
    assert plan.pages[0].route == "ocr" and "[deepseek-ocr]" in plan.pages[0].reason


def test_german_math_text_survives_the_default_engine(tmp_path: Path) -> None:
    """`heißt`, `∈`, `∅` and `€` were stored as `heift`, `E`, `0` and `E` by RapidOCR."""
    pdf = write_pdf(tmp_path / "math.pdf", ["german-math", "formula", "table"])
    settings = Settings(database_url="sqlite://", engine="rapidocr")
    plans = plan_pages(pdf, settings, [1, 2, 3])
    records = recognize_pages(pdf, settings, plans, RapidOcrEngine())
    assert [r.fields["route"] for r in records] == ["text-layer"] * 3
    stored = records[0].attempts[-1].result_fields["markdown"]
    for word in ("heißt", "für", "x ∈ Ux", "Ux ∩ Uy = ∅", "EUR (€)", "Räume"):
        assert word in stored
