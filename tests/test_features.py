"""Page features: text-layer trust, layout structure and pixel statistics."""

from __future__ import annotations

import json

import numpy as np
import pymupdf
import pytest

from bench.routing_corpus import born_digital, scan_of
from tasks.estimate import count_text_tokens
from tasks.features import extract_page_features
from tasks.pixel_stats import measure_ink, measure_page_pixels

BODY = (
    "The county archive received forty-two boxes of parish registers in the spring of 1987. "
    "Each register was photographed twice, once for the reading room and once for storage. "
) * 6


def _text_page(text: str = BODY, **insert_options) -> pymupdf.Page:
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_textbox(pymupdf.Rect(72, 72, 523, 770), text, fontsize=11, **insert_options)
    return page


def test_born_digital_report_is_trusted_and_counted_exactly():
    page = born_digital("report", "latin", 1)[0]
    features = extract_page_features(page)
    assert features.text_trusted and features.has_trustworthy_text
    lines = [line for line in page.get_text().splitlines() if line.strip()]
    assert features.text_tokens == count_text_tokens("\n".join(lines))
    assert features.columns == 1
    assert not features.table_like
    assert features.script == "latin"
    assert features.pixels is None  # no render needed for a trusted, image-free page
    assert 10 <= features.font_size <= 11


def test_two_column_newspaper_and_table_structure():
    two_column = extract_page_features(born_digital("two-column", "latin", 1)[0])
    newspaper = extract_page_features(born_digital("newspaper", "cjk", 1)[0])
    table = extract_page_features(born_digital("table", "latin", 1)[0])
    assert two_column.columns == 2 and not two_column.table_like
    assert newspaper.columns >= 4 and newspaper.script == "cjk"
    assert table.table_like and table.rulings_h >= 3 and table.rulings_v >= 3


def _page_in_unmapped_cid_font() -> pymupdf.Page:
    """A page whose text uses an Identity-H CID font without ToUnicode: the glyph ids are
    known, their characters are not (what broken PDF producers write)."""
    doc = pymupdf.open()
    page = doc.new_page()
    descendant = doc.get_new_xref()
    doc.update_object(
        descendant,
        "<< /Type /Font /Subtype /CIDFontType2 /BaseFont /GarbledSans /CIDSystemInfo "
        "<< /Registry (Adobe) /Ordering (Identity) /Supplement 0 >> /FontDescriptor "
        "<< /Type /FontDescriptor /FontName /GarbledSans /Flags 32 /FontBBox [0 -200 1000 900] "
        "/ItalicAngle 0 /Ascent 900 /Descent -200 /CapHeight 700 /StemV 80 >> /DW 600 >>",
    )
    font = doc.get_new_xref()
    doc.update_object(
        font,
        "<< /Type /Font /Subtype /Type0 /BaseFont /GarbledSans /Encoding /Identity-H "
        f"/DescendantFonts [{descendant} 0 R] >>",
    )
    lines = []
    for row in range(40):
        glyph_ids = "".join(f"{(row * 40 + i) % 90 + 3:04x}" for i in range(60))
        lines.append(f"BT /F1 11 Tf 72 {760 - 14 * row} Td <{glyph_ids}> Tj ET")
    content = doc.get_new_xref()
    doc.update_object(content, "<< >>")
    doc.update_stream(content, "\n".join(lines).encode())
    doc.xref_set_key(page.xref, "Contents", f"{content} 0 R")
    doc.xref_set_key(page.xref, "Resources", f"<< /Font << /F1 {font} 0 R >> >>")
    return page


def test_cid_font_without_unicode_map_is_not_trusted():
    features = extract_page_features(_page_in_unmapped_cid_font())
    assert features.has_text_layer
    assert features.unmapped_font_ratio == 1.0
    assert not features.text_trusted and "CID fonts" in features.distrust_reason
    assert features.pixels is not None  # an untrusted page is measured from pixels instead


def test_shifted_glyph_mapping_is_not_trusted():
    # A font whose glyph ids map to the wrong letters reads like a Caesar cipher: few vowels.
    shifted = "".join(chr((ord(c) - 97 + 5) % 26 + 97) if c.islower() else c for c in BODY)
    features = extract_page_features(_text_page(shifted))
    assert not features.text_trusted
    assert "vowels" in features.distrust_reason


def test_invisible_text_of_an_earlier_ocr_is_not_trusted():
    features = extract_page_features(_text_page(render_mode=3))
    assert features.has_text_layer
    assert features.invisible_ratio == 1.0
    assert not features.text_trusted and "invisible" in features.distrust_reason


def test_scan_has_no_text_layer_and_pixel_lines_match():
    source = born_digital("report", "latin", 1)
    scan_page = scan_of(source)[0]
    features = extract_page_features(scan_page)
    assert not features.has_text_layer
    assert features.image_coverage > 0.95
    pixels = features.pixels
    text_lines = len([line for line in source[0].get_text().splitlines() if line.strip()])
    assert abs(pixels.text_lines - text_lines) <= 0.1 * text_lines
    assert pixels.script == "latin" and pixels.columns == 1


def test_cjk_scan_is_recognised_as_cjk():
    pixels = measure_page_pixels(scan_of(born_digital("letter", "cjk", 1))[0])
    assert pixels.script == "cjk"


def test_tilted_scan_is_straightened_before_lines_are_counted():
    source = born_digital("letter", "latin", 1)[0]
    pixmap = source.get_pixmap(dpi=100, colorspace=pymupdf.csGRAY)
    from PIL import Image

    image = Image.frombytes("L", (pixmap.width, pixmap.height), pixmap.samples)
    tilted = np.asarray(image.rotate(2.0, expand=True, fillcolor=255)) < 128
    text_lines = len([line for line in source.get_text().splitlines() if line.strip()])
    pixels = measure_ink(tilted, 100.0)
    assert abs(pixels.text_lines - text_lines) <= 2
    assert pixels.columns == 1


def test_blank_page_has_no_ink():
    doc = pymupdf.open()
    features = extract_page_features(doc.new_page())
    assert not features.has_text_layer
    assert features.pixels.blank


@pytest.mark.parametrize("kind", ["slide", "table", "newspaper"])
def test_features_are_json_serialisable(kind):
    scan = scan_of(born_digital(kind, "latin", 1))
    for page in (born_digital(kind, "latin", 1)[0], scan[0]):
        data = extract_page_features(page).to_dict()
        assert json.loads(json.dumps(data)) == data
