"""Cheap per-page features for routing, read from PyMuPDF without OCR.

One `get_text("dict")` pass gives the text layer, its fonts and lines; `get_drawings` gives ruling
lines; `get_image_info` image placements. Pages whose text layer is missing, untrustworthy or
covered by images also get pixel statistics from a low-resolution render (`tasks.pixel_stats`).

Trust checks follow MinerU's `pdf_classify` and marker's `check_page`/`detect_bad_ocr`, applied
per page: replacement and other abnormal characters, CID fonts without a Unicode mapping,
invisible (render mode 3, i.e. earlier OCR) text, symbol garbage and Latin text without vowels
(glyph ids mapped to letters). Born-digital pages take ~10-30 ms on one core.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pymupdf

from tasks.estimate import count_text_tokens
from tasks.layout import LineBox, count_columns
from tasks.pixel_stats import PixelStats, measure_page_pixels

TEXT_FLAGS = pymupdf.TEXT_PRESERVE_WHITESPACE | pymupdf.TEXT_MEDIABOX_CLIP
# MuPDF span char_flags: the glyph is filled or stroked. Neither means invisible text.
VISIBLE_CHAR_FLAGS = 16 | 32
SCRIPT_PATTERNS = {
    "cjk": re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]"),
    "latin": re.compile(r"[A-Za-z\u00c0-\u024f]"),
    "cyrillic": re.compile(r"[\u0400-\u04ff]"),
    "greek": re.compile(r"[\u0370-\u03ff]"),
    "arabic": re.compile(r"[\u0600-\u06ff]"),
}
ABNORMAL = re.compile(r"[\ufffd\ue000-\uf8ff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
ASCII_SYMBOLS = re.compile(r"[!-/:-@\[-`{-~]")
LATIN_VOWELS = re.compile(r"[aeiouyAEIOUY\u00c0-\u00c6\u00c8-\u00cf\u00d2-\u00d6\u00d9-\u00dd"
                          r"\u00e0-\u00e6\u00e8-\u00ef\u00f2-\u00f6\u00f9-\u00fd]")  # fmt: skip
MATH_CHARS = re.compile(r"[\u2200-\u22ff\u2a00-\u2aff\U0001d400-\U0001d7ff]")
MATH_FONTS = re.compile(r"CMMI|CMSY|CMEX|MSBM|MSAM|Math|STIX|Symbol", re.IGNORECASE)
SUBSET_PREFIX = re.compile(r"^[A-Z]{6}\+")

# Trust thresholds (MinerU: abnormal >= 3% -> OCR; marker: invisible text is earlier OCR).
MAX_ABNORMAL_RATIO = 0.03
MAX_UNMAPPED_FONT_RATIO = 0.5
MAX_INVISIBLE_RATIO = 0.5
MAX_SYMBOL_RATIO = 0.35
MIN_LATIN_VOWEL_RATIO = 0.22
MIN_LETTERS_FOR_VOWEL_CHECK = 200
# Pixel statistics are needed where the text layer may not hold the page's text.
PIXEL_STATS_IMAGE_COVERAGE = 0.3
# Ruling lines: at least this long (pt) and at most this thick.
MIN_RULE_LENGTH = 10.0
MAX_RULE_THICKNESS = 2.0
COVERAGE_GRID = 64


@dataclass(frozen=True)
class PageFeatures:
    """What routing knows about a page. Sizes in points; ratios over non-whitespace characters."""

    width: float
    height: float
    text_chars: int  # non-whitespace characters in the text layer
    text_tokens: int  # DeepSeek-OCR tokens of the text layer (0 without one)
    text_lines: int
    text_blocks: int
    columns: int  # typical number of side-by-side text columns
    text_coverage: float  # page area under text lines
    font_size: float  # character-weighted median font size (pt), 0 without text
    script: str  # dominant script of the text layer: latin, cjk, cyrillic, ... or "none"
    abnormal_ratio: float  # U+FFFD, private-use, control characters
    unmapped_font_ratio: float  # text in CID fonts with Identity encoding and no ToUnicode
    invisible_ratio: float  # render mode 3 text (an earlier OCR layer)
    symbol_ratio: float  # ASCII punctuation/symbols
    latin_vowel_ratio: float  # vowels among Latin letters (glyph-id garbage has few)
    math_ratio: float  # math symbols or math fonts
    text_trusted: bool
    distrust_reason: str | None
    rulings_h: int
    rulings_v: int
    table_like: bool
    image_coverage: float
    drawing_paths: int
    pixels: PixelStats | None
    script_chars: dict[str, int] = field(default_factory=dict)  # text-layer characters per script
    # Distinct characters of the text layer: what OCR would have to reproduce. Kept out of
    # `to_dict` (a CJK page has thousands); the router reads it in the process that routes.
    layer_chars: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @property
    def has_text_layer(self) -> bool:
        return self.text_chars > 0

    @property
    def has_trustworthy_text(self) -> bool:
        """A text layer good enough to stand in for OCR (route or fallback)."""
        return self.text_trusted and self.text_chars > 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (stored in `page.features`)."""
        data = asdict(self)
        del data["layer_chars"]
        return data


def script_counts(text: str) -> dict[str, int]:
    """Characters of `text` per script (`SCRIPT_PATTERNS`), scripts absent left out."""
    counts = {name: len(pattern.findall(text)) for name, pattern in SCRIPT_PATTERNS.items()}
    return {name: count for name, count in counts.items() if count}


def _script_of(counts: dict[str, int]) -> str:
    return max(counts.items(), key=lambda item: item[1])[0] if counts else "none"


def _unmapped_fonts(page: pymupdf.Page) -> set[str]:
    """Names of Type0 fonts with an Identity CMap and no ToUnicode: their text is guesswork."""
    names = set()
    doc = page.parent
    for xref, _ext, font_type, basefont, _name, encoding in page.get_fonts():
        if font_type != "Type0" or not encoding.startswith("Identity"):
            continue
        if doc.xref_get_key(xref, "ToUnicode")[0] == "null":
            names.add(SUBSET_PREFIX.sub("", basefont))
    return names


def _rulings(page: pymupdf.Page) -> tuple[int, int, int]:
    """(horizontal rules, vertical rules, paths) among the page's vector drawings."""
    horizontal = vertical = 0
    paths = page.get_cdrawings()
    for path in paths:
        for item in path["items"]:
            if item[0] == "l":
                (x0, y0), (x1, y1) = item[1], item[2]
                dx, dy = abs(x1 - x0), abs(y1 - y0)
            elif item[0] == "re":
                x0, y0, x1, y1 = item[1]
                dx, dy = abs(x1 - x0), abs(y1 - y0)
                if dx > MAX_RULE_THICKNESS and dy > MAX_RULE_THICKNESS:
                    if path.get("color") is not None:  # a stroked frame: two of each
                        horizontal, vertical = horizontal + 2, vertical + 2
                    continue
            else:
                continue
            if dy <= MAX_RULE_THICKNESS and dx >= MIN_RULE_LENGTH:
                horizontal += 1
            elif dx <= MAX_RULE_THICKNESS and dy >= MIN_RULE_LENGTH:
                vertical += 1
    return horizontal, vertical, len(paths)


def _coverage(rects: list[pymupdf.Rect], page_rect: pymupdf.Rect) -> float:
    """Share of the page under the union of `rects`, on a coarse grid."""
    if not rects:
        return 0.0
    grid = np.zeros((COVERAGE_GRID, COVERAGE_GRID), dtype=bool)
    sx, sy = COVERAGE_GRID / page_rect.width, COVERAGE_GRID / page_rect.height
    for rect in rects:
        rect = rect & page_rect
        if rect.is_empty:
            continue
        y0, y1 = (rect.y0 - page_rect.y0) * sy, (rect.y1 - page_rect.y0) * sy
        x0, x1 = (rect.x0 - page_rect.x0) * sx, (rect.x1 - page_rect.x0) * sx
        grid[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = True
    return float(grid.mean())


def _distrust_reason(
    *, chars: int, abnormal: float, unmapped: float, invisible: float, symbols: float,
    latin_letters: int, vowels: float,
) -> str | None:  # fmt: skip
    if chars == 0:
        return "no text layer"
    if abnormal >= MAX_ABNORMAL_RATIO:
        return f"{abnormal:.0%} unmapped or abnormal characters"
    if unmapped >= MAX_UNMAPPED_FONT_RATIO:
        return f"{unmapped:.0%} of the text in CID fonts without a Unicode map"
    if invisible >= MAX_INVISIBLE_RATIO:
        return f"{invisible:.0%} of the text is invisible (an earlier OCR layer)"
    if symbols >= MAX_SYMBOL_RATIO:
        return f"{symbols:.0%} of the characters are symbols"
    if latin_letters >= MIN_LETTERS_FOR_VOWEL_CHECK and vowels < MIN_LATIN_VOWEL_RATIO:
        return f"only {vowels:.0%} vowels among Latin letters (garbled font mapping)"
    return None


def extract_page_features(page: pymupdf.Page) -> PageFeatures:
    """Features of one page; renders it (low resolution) only when the text layer is not
    enough to estimate its text."""
    page_rect = page.rect
    unmapped_fonts = _unmapped_fonts(page)
    line_texts: list[str] = []
    line_boxes: list[LineBox] = []
    sizes: Counter[float] = Counter()
    invisible = unmapped = math_font = 0
    blocks = 0
    for block in page.get_text("dict", flags=TEXT_FLAGS)["blocks"]:
        if block["type"] != 0:
            continue
        blocks += 1
        for line in block["lines"]:
            line_chars = 0
            parts = []
            for span in line["spans"]:
                text = span["text"]
                parts.append(text)
                n = len(text) - text.count(" ")
                line_chars += n
                sizes[round(span["size"], 1)] += n
                if span["alpha"] == 0 or not span["char_flags"] & VISIBLE_CHAR_FLAGS:
                    invisible += n
                if span["font"] in unmapped_fonts:
                    unmapped += n
                if MATH_FONTS.search(span["font"]):
                    math_font += n
            if line_chars:
                line_texts.append("".join(parts))
                line_boxes.append(LineBox(*line["bbox"], chars=line_chars))
    text = "\n".join(line_texts)
    chars = sum(box.chars for box in line_boxes)
    per_char = 1 / chars if chars else 0.0
    latin_letters = len(SCRIPT_PATTERNS["latin"].findall(text))
    abnormal_ratio = len(ABNORMAL.findall(text)) * per_char
    unmapped_ratio = unmapped * per_char
    invisible_ratio = invisible * per_char
    symbol_ratio = len(ASCII_SYMBOLS.findall(text)) * per_char
    vowel_ratio = len(LATIN_VOWELS.findall(text)) / latin_letters if latin_letters else 0.0
    scripts = script_counts(text)
    reason = _distrust_reason(
        chars=chars, abnormal=abnormal_ratio, unmapped=unmapped_ratio, invisible=invisible_ratio,
        symbols=symbol_ratio, latin_letters=latin_letters, vowels=vowel_ratio,
    )  # fmt: skip

    columns, table_rows = count_columns(line_boxes)
    rulings_h, rulings_v, drawing_paths = _rulings(page)
    image_rects = [pymupdf.Rect(info["bbox"]) for info in page.get_image_info()]
    image_coverage = _coverage(image_rects, page_rect)
    line_rects = [pymupdf.Rect(box.x0, box.y0, box.x1, box.y1) for box in line_boxes]
    pixels = None
    if reason is not None or image_coverage >= PIXEL_STATS_IMAGE_COVERAGE:
        pixels = measure_page_pixels(page)
    return PageFeatures(
        width=page_rect.width,
        height=page_rect.height,
        text_chars=chars,
        text_tokens=count_text_tokens(text) if chars else 0,
        text_lines=len(line_boxes),
        text_blocks=blocks,
        columns=columns,
        text_coverage=_coverage(line_rects, page_rect),
        font_size=_weighted_median(sizes),
        script=_script_of(scripts),
        abnormal_ratio=round(abnormal_ratio, 4),
        unmapped_font_ratio=round(unmapped_ratio, 4),
        invisible_ratio=round(invisible_ratio, 4),
        symbol_ratio=round(symbol_ratio, 4),
        latin_vowel_ratio=round(vowel_ratio, 4),
        math_ratio=round((len(MATH_CHARS.findall(text)) + math_font) * per_char, 4),
        text_trusted=reason is None,
        distrust_reason=reason,
        rulings_h=rulings_h,
        rulings_v=rulings_v,
        table_like=(rulings_h >= 3 and rulings_v >= 3) or table_rows >= 4,
        image_coverage=round(image_coverage, 4),
        drawing_paths=drawing_paths,
        pixels=pixels,
        script_chars=scripts,
        layer_chars=frozenset(text) - {" ", "\n"},
    )


def _weighted_median(weights: Counter[float]) -> float:
    total = sum(weights.values())
    running = 0
    for value in sorted(weights):
        running += weights[value]
        if running * 2 >= total:
            return value
    return 0.0
