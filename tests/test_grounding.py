"""Parsing DeepSeek-OCR grounded output: every block type, and outputs that are broken."""

from __future__ import annotations

import pytest
from PIL import Image

from models.deepseek_ocr.grounding import (
    crop_figures,
    parse_boxes,
    parse_grounded_output,
)
from models.deepseek_ocr.prompts import Prompt, locate_prompt

LETTER = {"page_width": 612.0, "page_height": 792.0}  # PDF points

PAGE_OUTPUT = (
    "<|ref|>header<|/ref|><|det|>[[60, 20, 400, 35]]<|/det|>\nAnnual Report 2024\n\n"
    "<|ref|>title<|/ref|><|det|>[[100, 50, 900, 90]]<|/det|>\n# Results\n\n"
    "<|ref|>sub_title<|/ref|><|det|>[[100, 100, 500, 120]]<|/det|>\n## Revenue\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 130, 900, 200]]<|/det|>\nRevenue grew by 12%.\n\n"
    "<|ref|>list<|/ref|><|det|>[[100, 210, 900, 260]]<|/det|>\n- first\n- second\n\n"
    "<|ref|>equation<|/ref|><|det|>[[200, 270, 800, 300]]<|/det|>\n"
    "\\[\nf(x) \\coloneqq x^2, \\quad g \\eqqcolon h\n\\]\n\n"
    "<|ref|>table_caption<|/ref|><|det|>[[100, 310, 600, 330]]<|/det|>\nTable 1: Sales\n\n"
    "<|ref|>table<|/ref|><|det|>[[100, 340, 900, 500]]<|/det|>\n"
    "<table><tr><td>Q1</td><td>10</td></tr><tr><td>Q2</td><td>12</td></tr></table>\n\n"
    "<|ref|>table_footnote<|/ref|><|det|>[[100, 505, 600, 520]]<|/det|>\n* unaudited\n\n"
    "<|ref|>image<|/ref|><|det|>[[0, 530, 499, 999]]<|/det|>\n\n\n\n"
    "<|ref|>image_caption<|/ref|><|det|>[[100, 960, 600, 980]]<|/det|>\n"
    "<center>Figure 1: Growth</center>\n\n"
    "<|ref|>footer<|/ref|><|det|>[[450, 985, 550, 995]]<|/det|>\nPage 3"
    "<｜end▁of▁sentence｜>"
)


def test_every_block_type_becomes_a_labelled_block() -> None:
    page = parse_grounded_output(PAGE_OUTPUT, **LETTER, page_label="3")
    assert [block.label for block in page.blocks] == [
        "header",
        "title",
        "sub_title",
        "text",
        "list",
        "equation",
        "table_caption",
        "table",
        "table_footnote",
        "image",
        "image_caption",
        "footer",
    ]
    by_label = {block.label: block for block in page.blocks}
    assert by_label["title"].text == "# Results"
    assert by_label["list"].text == "- first\n- second"
    assert by_label["table"].text.startswith("<table><tr><td>Q1</td>")
    assert by_label["equation"].text == "\\[\nf(x) := x^2, \\quad g =: h\n\\]"
    assert by_label["image"].text == ""
    assert by_label["footer"].text == "Page 3"  # the end-of-sentence token is not content
    assert by_label["text"].boxes_bins == [[100, 130, 900, 200]]
    # int(c / 999 * W) in page points.
    assert by_label["text"].boxes_page == [[61.0, 103.0, 551.0, 158.0]]
    assert by_label["image"].boxes_page == [[0.0, 420.0, 305.0, 792.0]]


def test_markdown_drops_tags_references_figures_and_collapses_blank_lines() -> None:
    markdown = parse_grounded_output(PAGE_OUTPUT, **LETTER, page_label="3").markdown
    assert "<|" not in markdown
    assert "<｜end" not in markdown
    assert "\n\n\n" not in markdown
    assert markdown.startswith("Annual Report 2024\n\n# Results\n\n## Revenue\n\nRevenue grew")
    assert "![](images/3_0.jpg)\n\n<center>Figure 1: Growth</center>" in markdown
    assert "<table><tr><td>Q1</td><td>10</td></tr>" in markdown
    assert "f(x) := x^2" in markdown and "\\coloneqq" not in markdown
    assert markdown.endswith("Page 3")


def test_figure_references_without_a_page_label() -> None:
    raw = (
        "<|ref|>image<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n"
        "<|ref|>image<|/ref|><|det|>[[5, 6, 7, 8]]<|/det|>"
    )
    markdown = parse_grounded_output(raw, page_width=100, page_height=100).markdown
    assert markdown == "![](images/0.jpg)\n\n![](images/1.jpg)"


def test_figures_are_cropped_from_the_page_image() -> None:
    image = Image.new("RGB", (1000, 2000), (255, 255, 255))
    image.paste((200, 0, 0), (100, 400, 600, 1000))
    raw = (
        "<|ref|>text<|/ref|><|det|>[[0, 0, 999, 100]]<|/det|>\nhello\n"
        "<|ref|>image<|/ref|><|det|>[[100, 200, 599, 499]]<|/det|>\n"
    )
    page = parse_grounded_output(raw, page_width=500, page_height=1000)
    figures = crop_figures(page.blocks, image)
    assert len(figures) == 1
    block, crop = figures[0]
    assert block.label == "image"
    # int(100/999*1000)=100, int(200/999*2000)=400, int(599/999*1000)=599, int(499/999*2000)=998
    assert crop.size == (499, 598)
    assert crop.getpixel((10, 10)) == (200, 0, 0)


def test_figure_with_several_boxes_is_cropped_to_their_union() -> None:
    image = Image.new("RGB", (999, 999))
    raw = "<|ref|>image<|/ref|><|det|>[[10, 10, 20, 20], [50, 60, 70, 80]]<|/det|>"
    page = parse_grounded_output(raw, page_width=999, page_height=999)
    ((_, crop),) = crop_figures(page.blocks, image)
    assert crop.size == (60, 70)


def test_output_without_tags_is_one_text_block() -> None:
    page = parse_grounded_output("Just the words.\n\n\n\nMore.", page_width=1, page_height=1)
    assert [(b.label, b.text, b.boxes_bins) for b in page.blocks] == [
        ("text", "Just the words.\n\n\n\nMore.", [])
    ]
    assert page.markdown == "Just the words.\n\nMore."


@pytest.mark.parametrize("raw", ["", "   \n", "<｜end▁of▁sentence｜>"])
def test_empty_output_gives_no_blocks(raw: str) -> None:
    page = parse_grounded_output(raw, page_width=10, page_height=10)
    assert page.blocks == []
    assert page.markdown == ""


def test_output_cut_inside_a_box_list_keeps_the_complete_boxes() -> None:
    raw = (
        "<|ref|>text<|/ref|><|det|>[[10, 20, 30, 40]]<|/det|>\nok\n"
        "<|ref|>table<|/ref|><|det|>[[1, 2, 3, 4], [5, 6"
    )
    page = parse_grounded_output(raw, page_width=999, page_height=999)
    assert [b.label for b in page.blocks] == ["text", "table"]
    assert page.blocks[1].boxes_bins == [[1, 2, 3, 4]]
    assert page.markdown == "ok"


def test_unclosed_det_followed_by_content_keeps_the_content() -> None:
    raw = "<|ref|>title<|/ref|><|det|>[[10, 20, 30, 40]]\n# 2024 Report\n<|ref|>text<|/ref|>body"
    page = parse_grounded_output(raw, page_width=999, page_height=999)
    assert [(b.label, b.text, b.boxes_bins) for b in page.blocks] == [
        ("title", "# 2024 Report", [[10, 20, 30, 40]]),
        ("text", "body", []),
    ]


@pytest.mark.parametrize(
    "raw",
    [
        "<|ref|>tit",  # cut inside the label
        "<|ref|>title<|/ref|><|det|>",  # cut right after the det tag
        "<|ref|>title<|/ref|><|det|>[[12, 3",  # cut inside the first box
        "<|ref|>title<|/ref|><|det|>[[1, 2, 3, 4]]<|/d",  # cut inside the closing tag
    ],
)
def test_output_cut_at_the_token_limit_never_raises(raw: str) -> None:
    page = parse_grounded_output("intro\n" + raw, page_width=100, page_height=100)
    assert page.blocks[0].text.startswith("intro")
    assert "<|ref|>" not in page.markdown


def test_box_lists_that_are_not_integer_quadruples_are_skipped() -> None:
    body = "[[a, b, c, d], [1.5, 2, 3, 4], [1, 2, 3], [1, 2, 3, 4, 5], [7, 8, 9, 10], []]"
    assert parse_boxes(body) == [[7, 8, 9, 10]]
    assert parse_boxes("__import__('os').system('echo no')") == []
    assert parse_boxes("[[1200, -5, 30, 40]]") == [[30, 0, 999, 40]]


def test_malformed_det_does_not_execute_or_crash() -> None:
    raw = "<|ref|>text<|/ref|><|det|>__import__('os').system('false')<|/det|>\nplain"
    page = parse_grounded_output(raw, page_width=100, page_height=100)
    assert [(b.label, b.text, b.boxes_bins) for b in page.blocks] == [("text", "plain", [])]


def test_stray_and_mismatched_tags_degrade_to_text() -> None:
    raw = (
        "<|/det|>a <|ref|>title<|det|>[[1, 2, 3, 4]]<|/det|> b<|/ref|> c\n"
        "<|ref|>text<|/ref|>no boxes here"
    )
    page = parse_grounded_output(raw, page_width=100, page_height=100)
    assert [(b.label, b.text, b.boxes_bins) for b in page.blocks] == [
        ("text", "a title b c", []),
        ("text", "no boxes here", []),
    ]
    assert page.markdown == "a title b c\nno boxes here"


def test_a_looping_page_parses_in_full() -> None:
    line = "<|ref|>text<|/ref|><|det|>[[100, 100, 900, 120]]<|/det|>\nThe same line again.\n\n"
    raw = line * 2000 + "<|ref|>text<|/ref|><|det|>[[100, 1"
    page = parse_grounded_output(raw, page_width=612, page_height=792)
    assert len(page.blocks) == 2001
    assert page.blocks[-1].boxes_bins == []
    assert page.markdown.count("The same line again.") == 2000


def test_degenerate_figure_box_still_yields_a_crop() -> None:
    raw = "<|ref|>image<|/ref|><|det|>[[999, 999, 999, 999]]<|/det|>"
    page = parse_grounded_output(raw, page_width=10, page_height=10)
    ((_, crop),) = crop_figures(page.blocks, Image.new("RGB", (50, 50)))
    assert crop.size == (1, 1)
    assert page.markdown == "![](images/0.jpg)"


def test_official_prompts() -> None:
    assert Prompt.DOCUMENT_MARKDOWN == "<image>\n<|grounding|>Convert the document to markdown."
    assert Prompt.FREE_OCR == "<image>\nFree OCR."
    assert Prompt.DOCUMENT_MARKDOWN.is_grounded and Prompt.OCR_IMAGE.is_grounded
    assert not Prompt.PARSE_FIGURE.is_grounded
    assert locate_prompt("the red car") == (
        "<image>\nLocate <|ref|>the red car<|/ref|> in the image."
    )
    with pytest.raises(ValueError):
        locate_prompt("<|ref|>x")
