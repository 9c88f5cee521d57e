"""Searchable PDF: the original pages, untouched, with an invisible text layer on OCR pages.

Each recognised line is written in text render mode 3 (neither filled nor stroked: invisible,
but extracted, searched and selected like printed text) at its box: the type size makes the
glyphs as tall as the line, and a horizontal scale makes them exactly as wide, so a selected
word highlights where it is printed. Pages that kept their own text layer, and blank pages,
get nothing.

Fonts come from PyMuPDF itself (no system fonts, nothing downloaded), all embedded: Nimbus
Sans first (Helvetica's metrics, the commonest print widths, so words drift least along a
scaled line; Latin, Greek, Cyrillic), then MuPDF's built-in Noto faces per script (Noto Serif,
Noto Naskh Arabic, Noto Serif Hebrew, Devanagari) and Droid Sans Fallback for CJK. Each
character takes the first font that has a glyph for it, and the fonts are subset when the file
is written, so a page of Latin text costs a few kilobytes, not the 4 MB CJK font. Arabic is
written right to left and shaped by MuPDF, so extraction yields Arabic presentation forms
(NFKC-equal to the stored letters; viewers search them as such).
"""

from __future__ import annotations

import unicodedata
from functools import cached_property
from pathlib import Path

import pymupdf

from tasks.exports.document import ExportDocument, ExportPage
from tasks.exports.layout import LayoutLine, page_layout

# UCDN script numbers MuPDF's `Font(script=...)` understands, in fallback order.
_SCRIPT_LATIN = 0  # Noto Serif: Latin, Greek, Cyrillic
_SCRIPT_HEBREW = 5
_SCRIPT_ARABIC = 6
_SCRIPT_DEVANAGARI = 9
INVISIBLE = 3  # PDF text render mode 3


class PageCountMismatch(ValueError):
    """The source has a different number of pages than were stored for it."""


class TextLayerFonts:
    """The fonts a text layer may need, loaded on first use (the CJK one is 4 MB)."""

    @cached_property
    def fallbacks(self) -> list[pymupdf.Font]:
        scripts = (_SCRIPT_LATIN, _SCRIPT_ARABIC, _SCRIPT_HEBREW, _SCRIPT_DEVANAGARI)
        by_script = [pymupdf.Font(script=script) for script in scripts]
        return [pymupdf.Font("helv"), *by_script, pymupdf.Font("cjk")]

    def font_for(self, ch: str) -> pymupdf.Font | None:
        return next((font for font in self.fallbacks if font.has_glyph(ord(ch))), None)

    def runs(self, text: str) -> list[tuple[str, pymupdf.Font]]:
        """`text` cut into runs that one font can show; spaces stay with the run before."""
        runs: list[tuple[str, pymupdf.Font]] = []
        for ch in text:
            if runs and (ch.isspace() or runs[-1][1].has_glyph(ord(ch))):
                runs[-1] = (runs[-1][0] + ch, runs[-1][1])
                continue
            font = self.font_for(ch)
            if font is None:
                continue  # no glyph anywhere: left out rather than written as a wrong letter
            if runs and runs[-1][1] is font:
                runs[-1] = (runs[-1][0] + ch, font)
            else:
                runs.append((ch, font))
        return runs


def render_pdf(document: ExportDocument, source: Path) -> bytes:
    """The source as PDF with a text layer on each OCR page. Image and e-book sources are
    converted to PDF first (their page boxes are what was stored)."""
    with pymupdf.open(source) as original:
        if original.is_pdf:
            return _with_text_layers(original, document)
        with pymupdf.open("pdf", original.convert_to_pdf()) as converted:
            return _with_text_layers(converted, document)


def _with_text_layers(pdf: pymupdf.Document, document: ExportDocument) -> bytes:
    if document.page_count is not None and pdf.page_count != document.page_count:
        raise PageCountMismatch(
            f"{document.source_uri} has {pdf.page_count} pages, {document.page_count} stored"
        )
    fonts = TextLayerFonts()
    for page in document.pages:
        if page.recognised:
            add_text_layer(pdf[page.page_no - 1], page, fonts)
    pdf.subset_fonts()
    return pdf.tobytes(garbage=3, deflate=True)


def add_text_layer(pdf_page: pymupdf.Page, page: ExportPage, fonts: TextLayerFonts) -> None:
    """Writes the page's recognised lines, invisible, where they are printed."""
    scale = pdf_page.rect.width / page.width if page.width else 1.0
    for block in page_layout(page):
        for line in block.lines:
            _write_line(pdf_page, line, scale, fonts)


def _write_line(
    pdf_page: pymupdf.Page, line: LayoutLine, scale: float, fonts: TextLayerFonts
) -> None:
    x0, y0, x1, y1 = (value * scale for value in line.box)
    runs = fonts.runs(line.text)
    if not runs or x1 <= x0 or y1 <= y0:
        return
    first = runs[0][1]
    size = (y1 - y0) / max(first.ascender - first.descender, 0.5)
    baseline = pymupdf.Point(x0, y1 + first.descender * size)
    right_to_left = _is_right_to_left(line.text) and len(runs) == 1
    writer = pymupdf.TextWriter(pdf_page.rect)
    position = baseline
    for text, font in runs:
        writer.append(position, text, font=font, fontsize=size, right_to_left=right_to_left)
        position = writer.last_point
    natural = writer.text_rect.width
    if natural <= 0:
        return
    writer.write_text(
        pdf_page,
        render_mode=INVISIBLE,
        morph=(baseline, pymupdf.Matrix((x1 - x0) / natural, 1)),
    )


def _is_right_to_left(text: str) -> bool:
    """Whether the first strongly directional character is Arabic or Hebrew."""
    for ch in text:
        direction = unicodedata.bidirectional(ch)
        if direction in ("R", "AL"):
            return True
        if direction == "L":
            return False
    return False
