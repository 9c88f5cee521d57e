"""Scanned multi-column pages are read column by column, full-width headings stay above the
columns they precede, and right-to-left text is stored in logical order. The scanned page is
made here: a two-column born-digital PDF rendered to pixels and wrapped as an image-only page,
read by the real RapidOCR engine."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pymupdf
from PIL import Image

from infra.settings import Settings
from models.engine import OcrRequest
from models.rapidocr_engine import RapidOcrEngine, is_right_to_left, visual_to_logical
from models.reading_order import Box, reading_order
from tasks.split import open_document

TITLE = "Annual Report of the Records Office"
MARKER = re.compile(r"(Left|Right)part(\d)sentence(\d)")


def two_column_scan(path: Path) -> Path:
    """Title over two columns of three paragraphs each. The paragraphs of both columns start
    on the same rows, so empty rows cross the whole page between them: the layout that was
    read paragraph by paragraph, left and right interleaved."""
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    page.insert_textbox(pymupdf.Rect(72, 60, 540, 100), TITLE, fontsize=18)
    for part in range(3):
        top = 110 + 200 * part
        for side, x0, x1 in (("Left", 72, 296), ("Right", 316, 540)):
            text = " ".join(f"{side} part {part} sentence {n} is here." for n in range(1, 6))
            assert page.insert_textbox(pymupdf.Rect(x0, top, x1, top + 150), text, fontsize=10) >= 0
    pixmap = page.get_pixmap(dpi=150)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples).save(buffer, "PNG")
    scan = pymupdf.open()
    scan.new_page(width=612, height=792).insert_image(pymupdf.Rect(0, 0, 612, 792), stream=buffer)
    scan.save(path)
    return path


def test_a_scanned_two_column_page_is_read_column_by_column(
    tmp_path: Path, settings: Settings
) -> None:
    with open_document(two_column_scan(tmp_path / "scan.pdf"), settings) as document:
        page = next(document.iter_pages())
        assert not page.fitz_page.get_text().strip(), "an image-only page"
        request = OcrRequest("1", page.render(settings.render_dpi), None, page.width, page.height)
    [result] = RapidOcrEngine().recognize([request])
    assert result.markdown.startswith(TITLE)
    markers = [match.groups() for match in MARKER.finditer(re.sub(r"\s", "", result.markdown))]
    assert len(markers) >= 24, f"most of the 30 sentences were read: {result.markdown}"
    sides = [side for side, _part, _sentence in markers]
    assert sides == sorted(sides), "every left-column sentence before any right-column one"
    for side in ("Left", "Right"):
        column = [(part, sentence) for s, part, sentence in markers if s == side]
        assert column == sorted(column), f"the {side} column is read top to bottom"


# --- the ordering itself, on boxes ---------------------------------------------------------------


def column_lines(x0: float, x1: float, top: float, rows: int) -> list[Box]:
    return [(x0, top + 20 * row, x1, top + 20 * row + 15) for row in range(rows)]


def test_paragraph_gaps_wider_than_the_gutter_do_not_interleave_the_columns() -> None:
    title = (50, 10, 550, 30)
    left, right = [], []
    for top in (40, 160, 280):  # three paragraphs per column, 40 units apart; gutter 20
        left += column_lines(50, 290, top, 4)
        right += column_lines(310, 550, top, 4)
    boxes = [*right, *left, title]
    assert [boxes[i] for i in reading_order(boxes, line_height=15)] == [title, *left, *right]


def test_a_heading_between_column_sections_stays_above_the_columns_it_precedes() -> None:
    title = (50, 10, 550, 30)
    first_left, first_right = column_lines(50, 290, 40, 4), column_lines(310, 550, 40, 4)
    heading = (50, 130, 400, 148)  # crosses the gutter
    second_left, second_right = column_lines(50, 290, 160, 3), column_lines(310, 550, 160, 3)
    boxes = [*second_right, heading, *first_right, title, *second_left, *first_left]
    expected = [title, *first_left, *first_right, heading, *second_left, *second_right]
    assert [boxes[i] for i in reading_order(boxes, line_height=15)] == expected


def test_a_skewed_heading_without_clean_rows_beside_it_still_splits_the_sections() -> None:
    left, right = column_lines(50, 290, 40, 6), column_lines(310, 550, 40, 6)
    heading = (60, 95, 540, 112)  # overlaps the rows of both columns: no empty row around it
    boxes = [*left, *right, heading]
    order = [boxes[i] for i in reading_order(boxes, line_height=15)]
    above = [box for box in left + right if (box[1] + box[3]) / 2 < (95 + 112) / 2]
    assert order.index(heading) == len(above)
    assert order[: len(above)] == [box for box in left if box in above] + [
        box for box in right if box in above
    ]


def test_specks_in_the_gutter_do_not_merge_the_columns() -> None:
    left, right = column_lines(50, 290, 40, 8), column_lines(310, 550, 40, 8)
    specks = [(297, 63, 303, 69), (298, 143, 302, 147)]  # dust between the columns
    boxes = [*left, *right, *specks]
    order = [boxes[i] for i in reading_order(boxes, line_height=15)]
    assert [box for box in order if box in right] == order[-len(right) :]
    assert [box for box in order if box in left] == left


def test_right_to_left_pages_read_the_right_column_and_the_right_cell_first() -> None:
    left, right = column_lines(50, 290, 40, 5), column_lines(310, 550, 40, 5)
    boxes = [*left, *right]
    order = reading_order(boxes, line_height=15, rtl=True)
    assert [boxes[i] for i in order] == [*right, *left]
    row = [(50, 10, 120, 25), (300, 10, 330, 25)]  # two short cells on one row
    assert reading_order(row, line_height=15, rtl=True) == [1, 0]
    assert reading_order(row, line_height=15) == [0, 1]


def test_right_to_left_lines_are_stored_in_logical_order() -> None:
    logical = "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd 2024 (ABC) \u05d8\u05d5\u05d1"
    # what a left-to-right recogniser emits: the glyphs from the left, numbers and Latin
    # words in their own order, brackets as they look
    visual = "\u05d1\u05d5\u05d8 (ABC) 2024 \u05dd\u05dc\u05d5\u05e2 \u05dd\u05d5\u05dc\u05e9"
    assert is_right_to_left(visual)
    assert visual_to_logical(visual) == logical
    arabic_visual = "\ufe8e\ufe92\ufef4\ufe92\ufea3 12"  # presentation forms, as OCR gives them
    assert visual_to_logical(arabic_visual) == "12 \ufea3\ufe92\ufef4\ufe92\ufe8e"
    for unchanged in ("habibi \u062d\u0628\u064a\u0628\u064a habibi", "Tuesday, 14 March"):
        assert visual_to_logical(unchanged) == unchanged
