"""Born-digital test pages made with PyMuPDF: the defects of issue 12 in documents of our own.

Text is written with MuPDF's built-in fonts (Nimbus Sans for Latin, ß, €, ∈ and friends; Noto
Naskh Arabic for Arabic), embedded, so the text layer holds exactly what the test wrote.
"""

from __future__ import annotations

from pathlib import Path

import pymupdf

A4 = (595.0, 842.0)
MARGIN = 72.0
GERMAN_MATH = (
    "Ein Raum heißt hausdorffsch, wenn es für je zwei Punkte x ≠ y disjunkte Umgebungen "
    "gibt: Ux ∩ Uy = ∅ mit x ∈ Ux und y ∈ Uy. Die Gebühr beträgt 12 EUR (€) für alle "
    "Räume über Köln und München."
)
ARABIC_WORD = "حبيبي"
FORMULAS = (
    "∀ε > 0 ∃δ > 0 : |x − y| < δ ⇒ |f(x) − f(y)| < ε",
    "∫₀¹ f(x) dx = ∑ₙ aₙ ≤ ∏ₖ (1 + bₖ)",
    "A ∩ B ⊆ A ∪ B, ∅ ∈ 𝒫(X), ∂f/∂x ≈ ∇f · e₁",
    "x ∈ ℝⁿ, ‖x‖ ≥ 0, ∑ᵢ xᵢ² = ‖x‖²",
)
SCAN_TEXT = (
    "The archive received forty-two boxes of parish registers in the spring. Each volume was "
    "numbered, measured and photographed before the conservators opened it. Water damage in "
    "the lower corners had glued several leaves together, so the team separated them over "
    "steam. Three registers from the northern chapels turned out to be copies made in the "
    "eighteenth century. The catalogue now lists baptisms, marriages and burials by parish, "
    "and readers may order scans through the reading room."
)
PROSE = (
    "The archive received forty-two boxes of parish registers in the spring, and the "
    "committee agreed that every volume would be catalogued before the summer recess. "
)


def _fonts() -> tuple[pymupdf.Font, pymupdf.Font]:
    return pymupdf.Font("helv"), pymupdf.Font(script=pymupdf.UCDN_SCRIPT_ARABIC)


def _write_lines(page: pymupdf.Page, lines: list[str], *, size: float = 11, top: float = MARGIN,
                 font: pymupdf.Font | None = None) -> float:  # fmt: skip
    """Writes `lines` down the page from `top`; returns the y below the last one."""
    writer = pymupdf.TextWriter(page.rect)
    font = font or _fonts()[0]
    y = top
    for line in lines:
        y += size * 1.4
        writer.append((MARGIN, y), line, font=font, fontsize=size)
    writer.write_text(page)
    return y


def _wrap(text: str, width: int = 80) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


def arabic_word_page(document: pymupdf.Document) -> pymupdf.Page:
    """`habibi` and the same word in Arabic script: OCR that cannot read Arabic loses it."""
    latin, arabic = _fonts()
    page = document.new_page(width=A4[0], height=A4[1])
    y = _write_lines(page, _wrap(PROSE * 3), font=latin)
    writer = pymupdf.TextWriter(page.rect)
    writer.append((MARGIN, y + 30), "habibi ", font=latin, fontsize=14)
    writer.append((MARGIN + 60, y + 30), ARABIC_WORD, font=arabic, fontsize=14)
    writer.write_text(page)
    return page


def german_math_page(document: pymupdf.Document) -> pymupdf.Page:
    """Running German text with `ß`, umlauts, `∈`, `∩`, `∅` and `€` in a paragraph."""
    page = document.new_page(width=A4[0], height=A4[1])
    _write_lines(page, _wrap(GERMAN_MATH * 2))
    return page


def formula_page(document: pymupdf.Document) -> pymupdf.Page:
    """Prose between display formulas: the text layer has the symbols, not the layout."""
    page = document.new_page(width=A4[0], height=A4[1])
    sentences = SCAN_TEXT.split(". ")
    y = MARGIN
    for number, formula in enumerate(FORMULAS):
        y = _write_lines(page, _wrap(". ".join(sentences[number : number + 2]) + "."), top=y)
        y = _write_lines(page, [formula], top=y + 6, size=12) + 6
    return page


TABLE_ROWS = (
    ("Item", "Qty", "Price"),
    ("Parish register", "42", "1,250.00"),
    ("Archive box", "12", "96.50"),
    ("Catalogue card", "500", "35.00"),
    ("Binding repair", "7", "420.00"),
    ("Total", "561", "1,801.50"),
)


def table_page(document: pymupdf.Document) -> pymupdf.Page:
    """A ruled three-column table under a heading line."""
    page = document.new_page(width=A4[0], height=A4[1])
    top = _write_lines(page, ["Invoice for conservation supplies, spring term"]) + 20
    columns = (MARGIN, MARGIN + 220, MARGIN + 300, MARGIN + 420)
    row_height = 24
    shape = page.new_shape()
    for row in range(len(TABLE_ROWS) + 1):
        y = top + row * row_height
        shape.draw_line((columns[0], y), (columns[-1], y))
    for x in columns:
        shape.draw_line((x, top), (x, top + len(TABLE_ROWS) * row_height))
    shape.finish(color=(0, 0, 0), width=0.8)
    shape.commit()
    writer = pymupdf.TextWriter(page.rect)
    font = _fonts()[0]
    for row, cells in enumerate(TABLE_ROWS):
        for column, cell in enumerate(cells):
            baseline = top + row * row_height + 16
            writer.append((columns[column] + 6, baseline), cell, font=font, fontsize=11)
    writer.write_text(page)
    return page


PAGE_MAKERS = {
    "arabic": arabic_word_page,
    "german-math": german_math_page,
    "formula": formula_page,
    "table": table_page,
}


def write_pdf(path: Path, kinds: list[str]) -> Path:
    """A PDF with one page of each kind, in order."""
    document = pymupdf.open()
    for kind in kinds:
        PAGE_MAKERS[kind](document)
    document.save(path, garbage=3, deflate=True)
    document.close()
    return path


def add_picture(page: pymupdf.Page, *, height: float = 360.0) -> pymupdf.Page:
    """A photo-like picture (noise, no text) across the lower part of the page, so the text
    layer no longer holds everything on it."""
    import numpy as np

    rng = np.random.default_rng(7)
    pixels = rng.integers(90, 200, size=(120, 160, 3), dtype=np.uint8)
    pixmap = pymupdf.Pixmap(pymupdf.csRGB, 160, 120, pixels.tobytes(), False)
    rect = pymupdf.Rect(MARGIN, page.rect.height - MARGIN - height,
                        page.rect.width - MARGIN, page.rect.height - MARGIN)  # fmt: skip
    page.insert_image(rect, pixmap=pixmap)
    return page


GERMAN_PROSE = (
    "Die Gebühr für das Gutachten heißt Grundgebühr und beträgt 12 EUR (€) für jedes Blatt. "
    "Größere Bestände über Köln und München werden gesondert berechnet. "
)


def german_prose_page(document: pymupdf.Document) -> pymupdf.Page:
    """German prose with `ß`, umlauts and `€`, no formulas."""
    page = document.new_page(width=A4[0], height=A4[1])
    _write_lines(page, _wrap(GERMAN_PROSE * 2))
    return page


PAGE_MAKERS["german-prose"] = german_prose_page


def scanned_page(document: pymupdf.Document) -> pymupdf.Page:
    """An image-only page: English prose (`SCAN_TEXT`) rendered at 150 dpi, no text layer."""
    source = pymupdf.open()
    _write_lines(source.new_page(width=A4[0], height=A4[1]), _wrap(SCAN_TEXT), size=12)
    pixmap = source[0].get_pixmap(dpi=150, colorspace=pymupdf.csGRAY)
    page = document.new_page(width=A4[0], height=A4[1])
    page.insert_image(page.rect, pixmap=pixmap)
    return page


def blank_page(document: pymupdf.Document) -> pymupdf.Page:
    return document.new_page(width=A4[0], height=A4[1])


PAGE_MAKERS["scan"] = scanned_page
PAGE_MAKERS["blank"] = blank_page
PAGE_MAKERS["arabic-picture"] = lambda document: add_picture(arabic_word_page(document))
PAGE_MAKERS["german-prose-picture"] = lambda document: add_picture(german_prose_page(document))
