"""Where each recognised line sits on its page: the geometry shared by the PDF text layer and
ALTO.

Engines store blocks, not lines. RapidOCR's blocks are paragraphs whose lines are joined by
newlines, and its raw output keeps every line's own box (in the pixels of the image it
recognised, which are recovered by scale). DeepSeek-OCR's blocks carry one grounding box and
text that may be a whole paragraph on one line: it is wrapped into as many rows as fit the box
at a plausible type size, so each word lands near where it is printed.
"""

from __future__ import annotations

import html
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from tasks.exports.document import ExportPage

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in page coordinates

FIGURE_LABELS = frozenset({"image", "figure", "picture", "chart"})
MAX_BIN = 999
TYPE_TO_LINE = 0.8  # type size as a share of line height: the rest is leading
MAX_ROWS = 400


@dataclass(frozen=True)
class LayoutLine:
    text: str
    box: Box


@dataclass(frozen=True)
class LayoutBlock:
    label: str
    box: Box
    lines: list[LayoutLine]


# --- text -------------------------------------------------------------------------------------

_TABLE_CELL_END = re.compile(r"</t[dh]\s*>", re.IGNORECASE)
_TABLE_ROW_END = re.compile(r"</tr\s*>|<br\s*/?>", re.IGNORECASE)
_TAG = re.compile(r"<[^>]+>")
_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+", re.MULTILINE)
_EMPHASIS = re.compile(r"(\*\*|__|`)")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}.*$", re.MULTILINE)
_PIPE = re.compile(r"\s*\|\s*")


def plain_text(markdown: str) -> str:
    """Stored markdown (or a block's HTML table) as the words a reader sees: no markup, one
    line per printed line or table row. This is the text a PDF layer and ALTO carry."""
    text = _TABLE_CELL_END.sub(" ", markdown)
    text = _TABLE_ROW_END.sub("\n", text)
    text = _TAG.sub("", text)
    text = _IMAGE.sub("", text)
    text = _HEADING.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _TABLE_RULE.sub("", text)
    lines = [_PIPE.sub(" ", line).strip() for line in html.unescape(text).split("\n")]
    return "\n".join(line for line in lines if line)


def em_width(text: str) -> float:
    """A rough width in ems: wide (CJK) characters one em, others half. Enough to decide how
    a paragraph wraps; the PDF writer measures real glyphs."""
    return sum(1.0 if unicodedata.east_asian_width(ch) in "WF" else 0.5 for ch in text)


# --- lines of a page --------------------------------------------------------------------------


def page_layout(page: ExportPage) -> list[LayoutBlock]:
    """The page's text blocks with positioned lines, in reading order; figures are left out."""
    raw_lines = _rapidocr_raw_lines(page) if page.engine == "rapidocr" else None
    layout = []
    for block in page.blocks:
        if block.get("label") in FIGURE_LABELS:
            continue
        box = _block_box(block, page)
        rows = plain_text(block.get("text") or "").split("\n")
        rows = [row for row in rows if row]
        if box is None or not rows:
            continue
        lines = _match_raw_lines(rows, box, raw_lines) if raw_lines else None
        lines = lines or stack_rows(rows, box)
        layout.append(LayoutBlock(block.get("label") or "text", box, lines))
    return layout


def _block_box(block: dict[str, Any], page: ExportPage) -> Box | None:
    sx, sy = page.width / MAX_BIN, page.height / MAX_BIN
    boxes = block.get("boxes_page") or [
        [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in block.get("boxes_bins") or []
    ]
    if not boxes:
        return None
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    x0, x1 = max(0.0, x0), min(page.width, x1)
    y0, y1 = max(0.0, y0), min(page.height, y1)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def stack_rows(rows: list[str], box: Box) -> list[LayoutLine]:
    """Rows laid top to bottom in `box`, each wrapped into as many printed lines as it needs
    at the type size that makes all of them fill the box's height."""
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    ems = [max(em_width(row), 0.5) for row in rows]
    count = len(rows)
    while True:
        size = height / count * TYPE_TO_LINE
        needed = [max(1, math.ceil(em * size / width)) for em in ems]
        if sum(needed) <= count or count >= MAX_ROWS:
            break
        count += 1
    pieces = [piece for row, n in zip(rows, needed, strict=True) for piece in _wrap(row, n)]
    line_height = height / len(pieces)
    full = max((em_width(p) for p in pieces), default=1.0) or 1.0
    lines = []
    for index, piece in enumerate(pieces):
        # A short last line of a paragraph is not stretched across the box.
        share = min(1.0, em_width(piece) / full) if len(pieces) > 1 else 1.0
        top = y0 + index * line_height
        lines.append(LayoutLine(piece, (x0, top, x0 + width * share, top + line_height)))
    return lines


def _wrap(row: str, count: int) -> list[str]:
    """`row` cut at spaces into at most `count` pieces of similar width. A run without spaces
    (CJK prose) is cut between characters, as it is printed."""
    words = row.split()
    if count > 1 and len(words) == 1:
        words = list(row)
        size = math.ceil(len(words) / count)
        return ["".join(words[i : i + size]) for i in range(0, len(words), size)]
    if count <= 1 or len(words) <= 1:
        return [row]
    target = em_width(row) / count
    pieces: list[list[str]] = [[]]
    for word in words:
        current = " ".join(pieces[-1])
        if pieces[-1] and em_width(current) + em_width(word) / 2 > target and len(pieces) < count:
            pieces.append([])
        pieces[-1].append(word)
    return [" ".join(piece) for piece in pieces]


def line_words(line: LayoutLine) -> list[tuple[str, Box]]:
    """The words of a line with boxes shared out by width (engines store no word boxes)."""
    x0, y0, x1, y1 = line.box
    total = em_width(line.text) or 1.0
    scale = (x1 - x0) / total
    words = []
    for match in re.finditer(r"\S+", line.text):
        start = x0 + em_width(line.text[: match.start()]) * scale
        end = x0 + em_width(line.text[: match.end()]) * scale
        words.append((match.group(), (start, y0, end, y1)))
    return words


# --- RapidOCR's own line boxes ------------------------------------------------------------------


def _rapidocr_raw_lines(page: ExportPage) -> list[LayoutLine] | None:
    """RapidOCR's recognised lines in page coordinates, or None when they cannot be read.

    The raw boxes are in the pixels of the (resized) image the engine saw; the blocks' boxes
    are the same lines in page coordinates, so the two extents give the scale."""
    from models.rapidocr_engine import restore_punctuation_spaces

    try:
        entries = json.loads(page.raw_output or "[]")
        raw = [
            (
                restore_punctuation_spaces(str(e["text"]).strip()),
                [float(p[0]) for p in e["box"]],
                [float(p[1]) for p in e["box"]],
            )
            for e in entries
        ]
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    page_boxes = [b for block in page.blocks for b in block.get("boxes_page") or []]
    if not raw or not page_boxes:
        return None
    raw_x0 = min(min(xs) for _, xs, _ in raw)
    raw_x1 = max(max(xs) for _, xs, _ in raw)
    page_x0 = min(b[0] for b in page_boxes)
    page_x1 = max(b[2] for b in page_boxes)
    if raw_x1 - raw_x0 <= 0:
        return None
    scale = (page_x1 - page_x0) / (raw_x1 - raw_x0)
    return [
        LayoutLine(text, (min(xs) * scale, min(ys) * scale, max(xs) * scale, max(ys) * scale))
        for text, xs, ys in raw
        if text
    ]


def _match_raw_lines(
    rows: list[str], box: Box, raw_lines: list[LayoutLine]
) -> list[LayoutLine] | None:
    """The raw lines of one block, in the block's row order; None unless every row is found."""
    slack = max(2.0, (box[3] - box[1]) * 0.05)
    found = []
    for row in rows:
        match = next(
            (
                line
                for line in raw_lines
                if line.text == row
                and line.box[0] >= box[0] - slack
                and line.box[1] >= box[1] - slack
                and line.box[2] <= box[2] + slack
                and line.box[3] <= box[3] + slack
            ),
            None,
        )
        if match is None or any(match is line for line in found):
            return None
        found.append(match)
    for line in found:
        raw_lines.remove(line)
    return found
