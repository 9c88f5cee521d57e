"""The CPU engines a newcomer gets without a GPU: the text layer of born-digital pages and
RapidOCR for pages that need OCR, scored against the samples' known text."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from infra.settings import EngineChoice, Settings
from models.engine import OcrEngine, OcrRequest, OcrResult
from models.rapidocr_engine import RapidOcrEngine, restore_punctuation_spaces
from models.reading_order import reading_order
from models.registry import EngineUnavailableError, build_engine
from models.text_metrics import character_error_rate, word_error_rate
from tasks.split import open_document
from tests.conftest import SAMPLES_DIR

GROUND_TRUTH = json.loads((SAMPLES_DIR / "ground_truth.json").read_text())


def text_layer(name: str, page_no: int, settings: Settings) -> OcrResult:
    with open_document(SAMPLES_DIR / name, settings) as document:
        return next(document.iter_pages(start=page_no, end=page_no)).text_layer_result()


def ocr_sample(engine: OcrEngine, name: str, page_no: int, settings: Settings) -> OcrResult:
    """OCR a sample page rendered exactly as the pipeline renders it."""
    with open_document(SAMPLES_DIR / name, settings) as document:
        page = next(document.iter_pages(start=page_no, end=page_no))
        request = OcrRequest(
            key=f"{name}#{page_no}",
            image=page.render(settings.render_dpi),
            mode=None,
            page_width=page.width,
            page_height=page.height,
        )
    [result] = engine.recognize([request])
    return result


# --- text layer --------------------------------------------------------------------------------


def test_text_layer_reads_headings_prose_and_the_ruled_table(settings: Settings) -> None:
    result = text_layer("report.pdf", 2, settings)
    assert result.engine == "pymupdf-text"
    assert [block.label for block in result.blocks][:2] == ["title", "text"]
    assert result.markdown.startswith("## Collections\n\nParish registers remain")
    [table] = [block for block in result.blocks if block.label == "table"]
    assert "|Collection|Volumes|Pages|Searchable|" in table.text
    assert "|Council minutes|96|14,250|98%|" in table.text
    assert "Council minutes 96" not in result.markdown  # table cells are not repeated as prose
    assert character_error_rate(result.raw_output, GROUND_TRUTH["report.pdf"][1]) < 0.1


def test_text_layer_title_is_a_level_one_heading(settings: Settings) -> None:
    result = text_layer("report.pdf", 1, settings)
    assert result.markdown.startswith(
        "# Valley Records Office: Annual Digitisation Report\n\n## Summary\n\n"
    )


def test_text_layer_reads_two_columns_in_column_order(settings: Settings) -> None:
    result = text_layer("two_column.pdf", 1, settings)
    truth = GROUND_TRUTH["two_column.pdf"][0]
    assert character_error_rate(result.markdown.replace("# ", ""), truth) < 0.01


def test_text_layer_boxes_are_in_page_points_and_bins(settings: Settings) -> None:
    result = text_layer("slide.pdf", 1, settings)
    assert result.blocks[0].label == "title"
    assert result.blocks[0].text == "Digitising the Parish Registers"
    for block in result.blocks:
        [[x0, y0, x1, y1]] = block.boxes_page
        assert 0 <= x0 < x1 <= 960 and 0 <= y0 < y1 <= 540
        expected_bins = [round(x0 / 960 * 999), round(y0 / 540 * 999)]
        expected_bins += [round(x1 / 960 * 999), round(y1 / 540 * 999)]
        assert block.boxes_bins == [expected_bins]


def test_image_only_page_has_an_empty_text_layer(settings: Settings) -> None:
    result = text_layer("scan.pdf", 1, settings)
    assert result.blocks == []
    assert result.markdown == ""


# --- RapidOCR ----------------------------------------------------------------------------------
# Thresholds sit about twice above what `bench/rapidocr_quality.py` measured (render at 144 dpi).


def test_rapidocr_reads_a_born_digital_page_almost_exactly(
    rapidocr: RapidOcrEngine, settings: Settings
) -> None:
    result = ocr_sample(rapidocr, "report.pdf", 1, settings)  # measured CER 0.2%, WER 2%
    truth = GROUND_TRUTH["report.pdf"][0]
    assert character_error_rate(result.markdown, truth) < 0.02
    assert word_error_rate(result.markdown, truth) < 0.05
    assert result.engine == "rapidocr" and result.model_revision.startswith("1.4")


def test_rapidocr_reads_a_noisy_scan(rapidocr: RapidOcrEngine, settings: Settings) -> None:
    result = ocr_sample(rapidocr, "scan.pdf", 1, settings)  # measured CER 0.9%
    assert character_error_rate(result.markdown, GROUND_TRUTH["scan.pdf"][0]) < 0.05
    for block in result.blocks:
        assert block.label == "text"
        [[x0, y0, x1, y1]] = block.boxes_page
        assert 0 <= x0 < x1 <= 612 and 0 <= y0 < y1 <= 792  # page points, not pixels


def test_rapidocr_keeps_receipt_prices_on_their_rows(
    rapidocr: RapidOcrEngine, settings: Settings
) -> None:
    result = ocr_sample(rapidocr, "receipt.png", 1, settings)  # measured CER 0.4%
    assert character_error_rate(result.markdown, GROUND_TRUTH["receipt.png"][0]) < 0.03
    flat = " ".join(result.markdown.split())
    assert "TOTAL 25.87" in flat
    assert "Map of the Valley 4.25" in flat


def test_rapidocr_returns_nothing_for_a_blank_page(rapidocr: RapidOcrEngine) -> None:
    request = OcrRequest("blank", Image.new("RGB", (1224, 1584), "white"), None, 612, 792)
    [result] = rapidocr.recognize([request])
    assert result.markdown == "" and result.blocks == []


def test_missing_spaces_after_punctuation_are_restored_only_where_prose_has_them() -> None:
    assert restore_punctuation_spaces("1.The minutes") == "1. The minutes"
    assert restore_punctuation_spaces("Tuesday,14 March") == "Tuesday, 14 March"
    for unchanged in ("8.40 pm", "1,000", "U.S.A. Today", "e.g. this", "http://x.org"):
        assert restore_punctuation_spaces(unchanged) == unchanged


# --- reading order and engine choice -----------------------------------------------------------


def test_reading_order_reads_columns_down_and_table_rows_across() -> None:
    title = (50, 10, 550, 30)
    left = [(50, 40 + 20 * i, 290, 55 + 20 * i) for i in range(5)]
    right = [(310, 40 + 20 * i, 550, 55 + 20 * i) for i in range(5)]
    columns = [title, *right, *left]  # shuffled on purpose
    assert reading_order(columns, line_height=15) == [0, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5]

    cells = [(50, 10 + 20 * r, 120, 25 + 20 * r) if c == 0 else (300, 10 + 20 * r, 330, 25 + 20 * r)
             for r in range(3) for c in (1, 0)]  # fmt: skip
    assert reading_order(cells, line_height=15) == [1, 0, 3, 2, 5, 4]


def test_auto_engine_without_a_checkpoint_is_rapidocr_and_resident(settings: Settings) -> None:
    engine = build_engine(settings)
    assert isinstance(engine, RapidOcrEngine)
    assert build_engine(settings) is engine


def test_deepseek_without_a_checkpoint_fails_clearly(settings: Settings) -> None:
    deepseek = settings.model_copy(update={"engine": EngineChoice.DEEPSEEK})
    with pytest.raises(EngineUnavailableError, match="OCRFLOW_MODEL_PATH"):
        build_engine(deepseek)
