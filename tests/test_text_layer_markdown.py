"""The text-layer route writes the markdown a person would: words rejoined across line ends,
ligatures expanded, running headers and page numbers left out, headings only where the type
says so, and tables as tables. Every document here is drawn by the test with PyMuPDF."""

from __future__ import annotations

import re
from collections.abc import Callable

import pymupdf
import pytest

from models import text_layer_context
from models.engine import OcrResult
from models.text_layer import read_text_layer
from models.text_layer_lines import TextRow, join_lines, normalise_text

A4 = (595, 842)
BODY = 11


def _document(*pages: Callable[[pymupdf.Page], None]) -> pymupdf.Document:
    """A document with one page per drawing function, reopened from its bytes as the pipeline
    opens files."""
    doc = pymupdf.open()
    for draw in pages:
        draw(doc.new_page(width=A4[0], height=A4[1]))
    return pymupdf.open("pdf", doc.tobytes())


def _read(doc: pymupdf.Document, page_no: int = 0) -> OcrResult:
    return read_text_layer(doc[page_no], key=str(page_no + 1))


def _lines(page: pymupdf.Page, y: float, lines: list[str], size: float = BODY) -> None:
    page.insert_text((72, y), lines, fontsize=size, fontname="helv")


def _html(page: pymupdf.Page, top: float, html: str, height: float = 60) -> None:
    page.insert_htmlbox(pymupdf.Rect(72, top, A4[0] - 72, top + height), html)


def _prose(page: pymupdf.Page, top: float = 200) -> None:
    """Six lines of body text, enough to establish the body size."""
    _lines(page, top, ["Running text of the page that fills the line with ordinary words."] * 6)


# --- words and characters ---------------------------------------------------------------------


def test_words_broken_at_line_ends_are_rejoined() -> None:
    doc = _document(
        lambda page: _lines(
            page,
            200,
            [
                "Lorem ipsum dolor sit amet, consectetur adip-",
                "iscing elit, sed do eiusmod tempor incidi-",
                "dunt ut labore et dolore magna aliqua.",
            ],
        )
    )
    markdown = _read(doc).markdown
    assert "consectetur adipiscing elit" in markdown
    assert "tempor incididunt ut" in markdown
    assert "adip-" not in markdown and "iscing elit" not in markdown.replace("adipiscing", "")


def test_real_hyphenated_compounds_keep_their_hyphen() -> None:
    doc = _document(
        lambda page: _lines(
            page,
            200,
            [
                "A well-known rule: a mother-in-law stays intact, and a Self-",
                "Evident truth keeps its capital; the test is well-",
                "known to every typesetter who splits COVID-",
                "19 across two lines of the text.",
            ],
        )
    )
    markdown = _read(doc).markdown
    assert "mother-in-law stays" in markdown  # not at a line end
    assert "Self-Evident truth" in markdown  # next line starts with a capital
    assert "is well-known to every" in markdown  # the page writes it with a hyphen elsewhere
    assert "COVID-19 across" in markdown


def test_soft_hyphen_is_always_a_break() -> None:
    assert join_lines(["The Donau\u00ad", "Dampfschiff sails"]) == "The DonauDampfschiff sails"
    assert join_lines(["a soft\u00adly spoken", "word"]) == "a softly spoken word"


def test_ligatures_are_expanded() -> None:
    doc = _document(
        lambda page: _html(
            page, 200, "<p style='font-size:11pt'>The ﬁrst ﬂoor oﬃce had a baﬄing ﬀ and ﬅ.</p>"
        )
    )
    page_text = doc[0].get_text()
    assert "\ufb01" in page_text  # the PDF really carries the ligature glyph
    markdown = _read(doc).markdown
    assert "The first floor office had a baffling ff and st." in markdown
    assert not re.search("[\ufb00-\ufb06]", markdown)


def test_compatibility_forms_are_normalised_without_touching_scripts() -> None:
    assert normalise_text("x² costs 5\u00a0€, ½ cup") == "x² costs 5 €, ½ cup"
    assert normalise_text("中文，测试。Ｆｕｌｌ") == "中文，测试。Ｆｕｌｌ"
    # Arabic presentation forms (shaped glyphs) back to the letters: حبيبي
    assert normalise_text("\ufea3\ufe92\ufef4\ufe92\ufef2") == "حبيبي"


def test_arabic_and_hebrew_stay_in_logical_order_with_every_character() -> None:
    doc = _document(
        lambda page: _html(
            page, 200, "<p style='font-size:11pt'>Word habibi حبيبي and שלום here, x² = 5 €.</p>"
        )
    )
    markdown = _read(doc).markdown
    assert markdown == "Word habibi حبيبي and שלום here, x² = 5 €."


# --- running headers, footers and page numbers ------------------------------------------------


def _report_page(number: int, footer: str) -> Callable[[pymupdf.Page], None]:
    def draw(page: pymupdf.Page) -> None:
        _lines(page, 40, ["Valley Records Office - Annual Report 2024"], size=9)
        _lines(page, 100, [f"Chapter {number} begins"], size=9)  # in the top band, not repeated
        _prose(page)
        _lines(page, A4[1] - 30, [footer], size=9)

    return draw


@pytest.mark.parametrize("footers", [["Page 1", "Page 2", "Page 3"], ["- 1 -", "- 2 -", "- 3 -"]])
def test_running_header_and_page_numbers_are_left_out(footers: list[str]) -> None:
    doc = _document(*(_report_page(n + 1, footer) for n, footer in enumerate(footers)))
    for page_no, footer in enumerate(footers):
        result = _read(doc, page_no)
        assert "Valley Records Office" not in result.markdown
        assert footer not in result.markdown
        assert "Running text of the page" in result.markdown
        assert f"Chapter {page_no + 1} begins" in result.markdown
        labels = {block.text: block.label for block in result.blocks}
        assert labels["Valley Records Office - Annual Report 2024"] == "header"
        assert labels[footer] == "footer"
        assert footer in result.raw_output  # kept in the raw text layer


def test_bare_page_numbers_at_the_top_repeat_across_pages() -> None:
    def page(number: int) -> Callable[[pymupdf.Page], None]:
        return lambda p: (_lines(p, 40, [str(number)], size=9), _prose(p))

    doc = _document(page(7), page(8), page(9))
    for page_no in range(3):
        assert _read(doc, page_no).markdown.startswith("Running text")


@pytest.mark.parametrize("footer", ["Page 1", "1", "- 1 -", "Page 1 of 1"])
def test_single_page_drops_a_lone_page_number(footer: str) -> None:
    doc = _document(lambda page: (_prose(page), _lines(page, A4[1] - 30, [footer], size=9)))
    assert _read(doc).markdown.endswith("ordinary words.")


def test_a_page_of_nothing_but_its_repeated_line_keeps_it() -> None:
    """One line per page, in the same place on each (a form, a label sheet): the line is the
    page's content, not a running header, and the page is not emptied."""
    doc = _document(
        *[lambda page, n=n: _lines(page, 72, [f"Record {n}: shelf 4"]) for n in (1, 2, 3)]
    )
    assert [_read(doc, i).markdown for i in range(3)] == [f"Record {n}: shelf 4" for n in (1, 2, 3)]


def test_single_page_keeps_footer_text_that_is_not_a_page_number() -> None:
    doc = _document(
        lambda page: (_prose(page), _lines(page, A4[1] - 30, ["Contact: office@example.org"]))
    )
    assert _read(doc).markdown.endswith("Contact: office@example.org")


def test_each_page_is_extracted_once_however_many_neighbours_read_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doc = _document(*(_report_page(n + 1, f"Page {n + 1}") for n in range(6)))
    calls: list[int] = []
    page_rows = text_layer_context.page_rows

    def counting(page: pymupdf.Page) -> list[list[TextRow]]:
        calls.append(page.number)
        return page_rows(page)

    monkeypatch.setattr(text_layer_context, "page_rows", counting)
    for page_no in range(6):
        assert "Page" not in _read(doc, page_no).markdown
    assert sorted(calls) == list(range(6))


# --- headings -------------------------------------------------------------------------------------


def test_headings_come_from_size_and_weight_not_from_short_lines() -> None:
    def draw(page: pymupdf.Page) -> None:
        _html(page, 60, "<b style='font-size:18pt'>Findings of the Survey</b>", height=40)
        _html(page, 110, "<b style='font-size:13pt'>Method</b>", height=30)
        _lines(page, 160, ["Jane Doe", "12 March 2024"])
        _prose(page)

    markdown = _read(_document(draw)).markdown
    assert markdown.startswith("# Findings of the Survey\n\n### Method\n\n")
    assert "Jane Doe\n12 March 2024" in markdown
    assert not re.search(r"^#+ (Jane|12 March)", markdown, re.MULTILINE)


def test_body_size_lines_are_not_headings_above_a_page_of_small_print() -> None:
    """A short letter whose disclaimer in small print has more characters than the letter."""

    def draw(page: pymupdf.Page) -> None:
        _lines(page, 100, ["Jane Doe", "12 March 2024"], size=12)
        _lines(page, 160, ["Thank you for the records you sent last week."], size=12)
        _lines(page, 600, ["Small print that goes on about terms and conditions at length."] * 8, 8)

    markdown = _read(_document(draw)).markdown
    assert "#" not in markdown
    assert "Jane Doe\n12 March 2024" in markdown


def test_bold_body_size_line_is_not_a_heading() -> None:
    doc = _document(
        lambda page: (_html(page, 100, "<b style='font-size:11pt'>Jane Doe</b>"), _prose(page))
    )
    assert _read(doc).markdown.startswith("Jane Doe\n\nRunning text")


def test_cover_page_headings_are_judged_against_the_following_pages() -> None:
    def cover(page: pymupdf.Page) -> None:
        _lines(page, 300, ["A Survey of Parish Registers"], size=14)

    assert _read(_document(cover, _prose, _prose)).markdown == "## A Survey of Parish Registers"
    assert _read(_document(cover)).markdown == "A Survey of Parish Registers"  # nothing to judge by


# --- tables ---------------------------------------------------------------------------------------

PRICES = [["Item", "Qty", "Price"], ["Coffee", "2", "3.50"], ["Large tea", "1", "2.10"]]


def _ruled(page: pymupdf.Page, rows: list[list[str | None]], top: float = 300) -> None:
    """A table drawn with lines; a None cell is covered by the cell to its left (a colspan)."""
    xs, ys = [72, 250, 350, 450], [top + 20 * i for i in range(len(rows) + 1)]
    for y in ys:
        page.draw_line((xs[0], y), (xs[-1], y))
    for c, x in enumerate(xs):
        for r in range(len(rows)):
            if not (0 < c < len(xs) - 1 and rows[r][c] is None):
                page.draw_line((x, ys[r]), (x, ys[r + 1]))
    for r, row in enumerate(rows):
        for c, text in enumerate(row):
            if text:
                page.insert_text((xs[c] + 4, ys[r] + 14), text, fontsize=10, fontname="helv")


def test_ruled_table_is_a_markdown_table_and_not_repeated_as_text() -> None:
    doc = _document(lambda page: (_prose(page, 100), _ruled(page, PRICES)))
    result = _read(doc)
    assert "|Item|Qty|Price|\n|---|---|---|\n|Coffee|2|3.50|\n|Large tea|1|2.10|" in result.markdown
    assert result.markdown.count("Coffee") == 1
    assert [block.label for block in result.blocks] == ["text", "table"]


def test_table_with_a_spanning_cell_is_html() -> None:
    rows = [["Item", "Price and tax", None], ["Coffee", "3.50", "0.35"], ["Tea", "2.10", "0.21"]]
    result = _read(_document(lambda page: (_prose(page, 100), _ruled(page, rows))))
    assert (
        '<table><tr><td>Item</td><td colspan="2">Price and tax</td></tr>'
        "<tr><td>Coffee</td><td>3.50</td><td>0.35</td></tr>" in result.markdown
    )
    assert result.markdown.count("Coffee") == 1


def test_unruled_price_list_keeps_each_price_on_its_item_row() -> None:
    def draw(page: pymupdf.Page) -> None:
        _prose(page, 100)
        for i, (item, qty, price) in enumerate([*PRICES, ["Coffee beans, 1 kg", "2", "24.00"]]):
            y = 300 + 18 * i
            page.insert_text((72, y), item, fontsize=10)
            page.insert_text((300, y), qty, fontsize=10)
            page.insert_text((480, y), price, fontsize=10)
        _lines(page, 450, ["A closing remark after the list."])

    result = _read(_document(draw))
    assert (
        "|Item|Qty|Price|\n|---|---|---|\n|Coffee|2|3.50|\n|Large tea|1|2.10|\n"
        "|Coffee beans, 1 kg|2|24.00|" in result.markdown
    )
    assert result.markdown.endswith("A closing remark after the list.")


def test_page_without_rules_never_runs_the_table_finder(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("find_tables ran on a page without rules")

    monkeypatch.setattr(pymupdf.Page, "find_tables", refuse)
    assert _read(_document(_prose)).markdown.startswith("Running text")


def test_heading_in_the_same_block_as_its_paragraph_is_split_from_it() -> None:
    def draw(page: pymupdf.Page) -> None:
        page.insert_text((72, 200), "Methods", fontsize=15, fontname="hebo")
        _lines(page, 216, ["We counted every register by hand, twice, in the reading room."] * 4)

    doc = _document(draw)
    assert len(doc[0].get_text("blocks")) == 1  # MuPDF puts both in one block
    markdown = _read(doc).markdown
    assert markdown.startswith("## Methods\n\nWe counted every register")


# --- scripts and robustness ---------------------------------------------------------------------


def test_cjk_lines_join_without_a_space() -> None:
    assert join_lines(["中文的段落在这里", "换行继续。"]) == "中文的段落在这里换行继续。"
    assert join_lines(["English text", "continues"]) == "English text continues"


def test_a_neighbour_mupdf_cannot_read_does_not_fail_the_page(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doc = _document(*(_report_page(n + 1, f"Page {n + 1}") for n in range(3)))
    page_rows = text_layer_context.page_rows

    def broken_second_page(page: pymupdf.Page) -> list[list[TextRow]]:
        if page.number == 1:
            raise RuntimeError("MuPDF error: cannot read page")
        return page_rows(page)

    monkeypatch.setattr(text_layer_context, "page_rows", broken_second_page)
    markdown = _read(doc, 0).markdown
    assert "Running text of the page" in markdown
    assert "Valley Records Office" not in markdown  # page 3 still shows the header repeats


def test_contents_entries_are_lines_not_headings() -> None:
    def draw(page: pymupdf.Page) -> None:
        _html(page, 60, "<b style='font-size:18pt'>Contents</b>", height=40)
        entries = [
            "1 Introduction . . . . . . . . . . . 1",
            "2 Methods . . . . . . . . . . . . . 4",
        ]
        _lines(page, 130, entries, size=14)
        _lines(
            page, 170, ["2.1 Sampling . . . . . . . . . . . . . 5", "2.2 Counting . . . . . . 7"]
        )
        _prose(page, 300)

    markdown = _read(_document(draw)).markdown
    chapters = "1 Introduction . . . . . . . . . . . 1\n2 Methods . . . . . . . . . . . . . 4"
    sections = "2.1 Sampling . . . . . . . . . . . . . 5\n2.2 Counting . . . . . . 7"
    assert markdown.startswith(f"# Contents\n\n{chapters}\n\n{sections}\n\n")


def test_lone_page_number_at_the_top_goes_but_a_chapter_numeral_stays() -> None:
    doc = _document(lambda page: (_lines(page, 40, ["8"], size=BODY), _prose(page)))
    assert _read(doc).markdown.startswith("Running text")
    doc = _document(lambda page: (_lines(page, 60, ["1"], size=40), _prose(page)))
    assert _read(doc).markdown.startswith("1\n\nRunning text")


def test_text_starting_with_a_hash_is_not_turned_into_a_heading() -> None:
    doc = _document(lambda page: (_lines(page, 100, ["# This file was generated."]), _prose(page)))
    result = _read(doc)
    assert result.markdown.startswith("\\# This file was generated.\n\nRunning text")
    assert result.blocks[0].text == "# This file was generated."


def test_the_same_title_on_consecutive_slides_is_kept() -> None:
    def slide(page: pymupdf.Page) -> None:
        _lines(page, 50, ["Results"], size=24)
        _lines(page, 200, ["Counts rose in every parish."] * 4, size=14)

    for page_no in range(2):
        assert _read(_document(slide, slide), page_no).markdown.startswith("# Results\n\n")


def test_cell_spanning_two_rows_is_an_html_rowspan() -> None:
    def draw(page: pymupdf.Page) -> None:
        _prose(page, 100)
        xs, ys = [72, 200, 300], [300, 320, 340, 360]
        for i, y in enumerate(ys):  # no rule under `Coffee`: it spans both price rows
            page.draw_line((xs[1] if i == 2 else xs[0], y), (xs[-1], y))
        for x in xs:
            page.draw_line((x, ys[0]), (x, ys[-1]))
        for x, y, text in [(76, 314, "Drink"), (204, 314, "Price"), (76, 345, "Coffee")]:
            page.insert_text((x, y), text, fontsize=10)
        page.insert_text((204, 334), "3.50 small", fontsize=10)
        page.insert_text((204, 354), "4.20 large", fontsize=10)

    assert _read(_document(draw)).markdown.endswith(
        '<table><tr><td>Drink</td><td>Price</td></tr><tr><td rowspan="2">Coffee</td>'
        "<td>3.50 small</td></tr><tr><td>4.20 large</td></tr></table>"
    )


def test_front_matter_headers_with_roman_page_numbers_are_left_out() -> None:
    def page(numeral: str) -> Callable[[pymupdf.Page], None]:
        return lambda p: (_lines(p, 40, [f"Preface {numeral}"], size=9), _prose(p))

    doc = _document(page("iv"), page("v"), page("vi"))
    for page_no in range(3):
        assert _read(doc, page_no).markdown.startswith("Running text")
    lone_word = _document(lambda p: (_prose(p), _lines(p, A4[1] - 30, ["civil"], size=9)))
    assert _read(lone_word).markdown.endswith("civil")  # letters of numerals, not a numeral
