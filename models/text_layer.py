"""A born-digital page's own text layer as an engine result (the `text-layer` route).

No model runs: PyMuPDF's text blocks become paragraphs, markedly larger fonts become headings,
and ruled tables become markdown tables. Table detection is gated on the page having both
horizontal and vertical rules, because `find_tables` costs tens to hundreds of milliseconds and
most pages have no ruled table.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pymupdf

from models.engine import Block, FinishReason, OcrResult
from models.reading_order import reading_order, to_bins

ENGINE_NAME = "pymupdf-text"
HEADING_SCALE = 1.2  # a short block this much larger than body text is a section heading
TITLE_SCALE = 1.6  # ... and this much larger, a title
MAX_HEADING_LINES = 3
MIN_RULES = 2  # horizontal and vertical rules needed before looking for a ruled table
TEXT_FLAGS = pymupdf.TEXTFLAGS_TEXT | pymupdf.TEXT_DEHYPHENATE

pymupdf.no_recommend_layout()  # find_tables would otherwise print an advert on stdout


@dataclass
class _TextBlock:
    bbox: tuple[float, float, float, float]
    lines: list[str]
    size: float  # character-weighted font size
    chars: int


def read_text_layer(page: pymupdf.Page, key: str) -> OcrResult:
    """The page's text layer as blocks (label `title`, `text` or `table`) and markdown."""
    width, height = page.rect.width, page.rect.height
    tables = _ruled_tables(page)
    text_blocks = [block for block in _text_blocks(page) if not _inside_any(block.bbox, tables)]
    body_size = _body_size(text_blocks)

    items: list[tuple[tuple[float, float, float, float], str, str, str]] = []
    for block in text_blocks:
        level = _heading_level(block, body_size)
        if level is not None:
            text = " ".join(block.lines)
            items.append((block.bbox, "title", text, f"{'#' * level} {text}"))
        else:
            text = " ".join(block.lines)
            items.append((block.bbox, "text", text, text))
    for table in tables:
        markdown = table.to_markdown().strip()
        items.append((tuple(table.bbox), "table", markdown, markdown))

    order = reading_order([item[0] for item in items], line_height=body_size * 1.2)
    ordered = [items[i] for i in order]
    blocks = [
        Block(
            label=label,
            text=text,
            boxes_bins=[to_bins(bbox, width, height)],
            boxes_page=[[round(v, 2) for v in bbox]],
        )
        for bbox, label, text, _ in ordered
    ]
    return OcrResult(
        key=key,
        markdown="\n\n".join(markdown for *_, markdown in ordered),
        blocks=blocks,
        raw_output="\n".join(text for _, _, text, _ in ordered),
        finish_reason=FinishReason.EOS,
        engine=ENGINE_NAME,
        model_revision=f"pymupdf-{pymupdf.__version__}",
    )


def _text_blocks(page: pymupdf.Page) -> list[_TextBlock]:
    blocks: list[_TextBlock] = []
    for raw in page.get_text("dict", flags=TEXT_FLAGS)["blocks"]:
        lines: list[str] = []
        sizes: Counter[float] = Counter()
        for line in raw.get("lines", []):
            text = "".join(span["text"] for span in line["spans"]).strip()
            if text:
                lines.append(text)
            for span in line["spans"]:
                sizes[round(span["size"], 1)] += len(span["text"].strip())
        chars = sum(sizes.values())
        if lines and chars:
            size = sum(size * count for size, count in sizes.items()) / chars
            blocks.append(_TextBlock(tuple(raw["bbox"]), lines, size, chars))
    return blocks


def _body_size(blocks: list[_TextBlock]) -> float:
    """The font size carrying the most characters: the page's running text."""
    by_size: Counter[float] = Counter()
    for block in blocks:
        by_size[round(block.size, 1)] += block.chars
    return by_size.most_common(1)[0][0] if by_size else 0.0


def _heading_level(block: _TextBlock, body_size: float) -> int | None:
    """`#` for a title-sized block, `##` for a section-sized one, None for running text.

    Levels come from the ratio to body text, not from a ranking of the page's sizes, so a
    section heading gets the same level on a page without a title."""
    if len(block.lines) > MAX_HEADING_LINES or not body_size:
        return None
    ratio = block.size / body_size
    if ratio >= TITLE_SCALE:
        return 1
    if ratio >= HEADING_SCALE:
        return 2
    return None


def _ruled_tables(page: pymupdf.Page) -> list[pymupdf.table.Table]:
    if not _has_rules(page):
        return []
    return [table for table in page.find_tables(strategy="lines").tables if table.row_count > 1]


def _has_rules(page: pymupdf.Page) -> bool:
    """Whether the page draws at least a couple of horizontal and vertical rules (1 ms)."""
    horizontal = vertical = 0
    for drawing in page.get_drawings():
        for item in drawing["items"]:
            if item[0] == "l":
                start, end = item[1], item[2]
                horizontal += abs(start.y - end.y) < 1 and abs(start.x - end.x) > 5
                vertical += abs(start.x - end.x) < 1 and abs(start.y - end.y) > 5
            elif item[0] == "re":
                rect = item[1]
                horizontal += rect.height < 2 and rect.width > 5
                vertical += rect.width < 2 and rect.height > 5
        if horizontal >= MIN_RULES and vertical >= MIN_RULES:
            return True
    return False


def _inside_any(bbox: tuple[float, float, float, float], tables: list) -> bool:
    centre_x, centre_y = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    return any(
        table.bbox[0] <= centre_x <= table.bbox[2] and table.bbox[1] <= centre_y <= table.bbox[3]
        for table in tables
    )
