"""Pixel statistics of a page without a trustworthy text layer: ink, text lines, characters.

A low-resolution grayscale render is binarised, ruling lines are removed, and the ink is cut into
text lines by recursive XY-cut on projection profiles (an empty row or a wide empty gutter splits
a region). A line's characters follow from its length over its height, because a script's glyph
advance is a near-constant fraction of the line's ink height: about 0.565 for Latin text (spaces
included in the length, not in the count) and about 1.045 for CJK. Both ratios were fitted on
born-digital pages rendered to images (`bench/routing.py` measures the resulting error).

The script itself is guessed from the lines' vertical ink profile: Latin lines concentrate their
ink in the x-height band (ascenders and descenders are sparse), CJK glyphs fill the line evenly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pymupdf

from models.ink_cuts import long_runs, runs, skew, xy_cut
from tasks.layout import LineBox, count_columns

PIXEL_DPI = 100
MAX_RENDER_PIXELS = 2_500_000  # posters and huge scans are rendered smaller, not slower
BLANK_INK_SHARE = 2e-4  # under this share of dark pixels a page counts as blank
MIN_CONTRAST = 40  # grey levels between ink and background; less is paper texture, not ink
# Glyph advance (per non-whitespace character) as a multiple of the line's ink height.
CHAR_WIDTH_PER_LINE_HEIGHT = {"latin": 0.565, "cjk": 1.045}
# A line whose ink is this much denser in its middle fifths than in its top/bottom fifths is
# Latin (x-height band); CJK glyphs give about 1.
LATIN_CORE_RATIO = 2.0
MIN_GUTTER_PT = 10.0  # a column gap; word spaces are 2-4 pt (typewriter: 7 pt)
MAX_SKEW_DEG = 5.0  # scans are straightened by up to this much before lines are cut
RULE_MIN_LENGTH_IN = (0.4, 0.6)  # horizontal / vertical runs this long are rules, not glyphs


@dataclass(frozen=True)
class PixelStats:
    """What a low-resolution render says about a page's text and layout."""

    dpi: float
    ink_share: float  # dark pixels / all pixels
    text_lines: int
    line_height_px: float  # median ink height of a body text line
    est_chars: int  # non-whitespace characters
    script: str  # "latin" | "cjk" | "none"
    core_ratio: float  # median middle/edge ink ratio of long lines (the script signal)
    columns: int  # typical side-by-side text columns
    table_rows: int  # bands of >= 3 short side-by-side pieces
    rules_h: int  # horizontal ruling lines
    rules_v: int  # vertical ruling lines

    @property
    def blank(self) -> bool:
        return self.ink_share < BLANK_INK_SHARE

    @property
    def looks_tabular(self) -> bool:
        """A ruled grid, or rows of short side-by-side cells."""
        return self.table_rows >= 4 or (self.rules_h >= 3 and self.rules_v >= 3)


BLANK_PIXELS = PixelStats(
    dpi=0.0, ink_share=0.0, text_lines=0, line_height_px=0.0, est_chars=0, script="none",
    core_ratio=0.0, columns=0, table_rows=0, rules_h=0, rules_v=0,
)  # fmt: skip


def render_gray(page: pymupdf.Page, dpi: float = PIXEL_DPI) -> tuple[np.ndarray, float]:
    """The page as a (H, W) uint8 grayscale array and the dpi it was rendered at."""
    rect = page.rect
    area_in2 = max(rect.width * rect.height / 72**2, 1e-6)
    dpi = min(dpi, (MAX_RENDER_PIXELS / area_in2) ** 0.5)
    pixmap = page.get_pixmap(dpi=max(int(dpi), 1), colorspace=pymupdf.csGRAY, alpha=False)
    buffer = np.frombuffer(pixmap.samples, dtype=np.uint8)  # a copy: the pixmap is freed
    gray = buffer.reshape(pixmap.height, pixmap.stride)[:, : pixmap.width]  # (H, W)
    return gray, float(int(dpi))


def _otsu_threshold(gray: np.ndarray) -> tuple[int, float]:
    """Otsu's threshold and the gap between the two class means."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = sum_low / weight_low
        mean_high = (sum_low[-1] - sum_low) / weight_high
        between = weight_low * weight_high * (mean_low - mean_high) ** 2
    between = np.nan_to_num(between)
    threshold = int(np.argmax(between))
    return threshold, float(np.nan_to_num(mean_high[threshold] - mean_low[threshold]))


def binarize(gray: np.ndarray) -> np.ndarray:
    """Ink mask (True = ink). Light-on-dark pages (dark slides) are inverted first."""
    if np.median(gray) < 128:
        gray = 255 - gray
    threshold, contrast = _otsu_threshold(gray)
    if contrast < MIN_CONTRAST:
        return np.zeros(gray.shape, dtype=bool)
    ink = gray <= threshold
    # Drop isolated specks (scanner noise) so they do not bridge line gaps.
    neighbours = np.zeros(ink.shape, dtype=np.uint8)
    neighbours[1:, :] += ink[:-1, :]
    neighbours[:-1, :] += ink[1:, :]
    neighbours[:, 1:] += ink[:, :-1]
    neighbours[:, :-1] += ink[:, 1:]
    return ink & (neighbours > 0)


def deskew(ink: np.ndarray) -> np.ndarray:
    """The ink mask sheared so its text lines run horizontally.

    A tilted scan has no empty rows between its lines, which defeats the XY-cut. The skew is
    `models.ink_cuts.skew`'s; shearing moves only the ink pixels, so this costs a few ms.
    """
    ys, xs = np.nonzero(ink)
    if len(ys) == 0:
        return ink
    angle = skew(ink, MAX_SKEW_DEG).degrees
    if abs(angle) < 0.05:
        return ink
    rows = ys - np.round(xs * np.tan(np.radians(angle))).astype(np.int64)
    rows -= rows.min()
    straight = np.zeros((int(rows.max()) + 1, ink.shape[1]), dtype=bool)
    straight[rows, xs] = True
    return straight


def _core_ratio(ink: np.ndarray, leaf: tuple[int, ...]) -> float:
    y0, y1, x0, x1 = leaf
    profile = ink[y0:y1, x0:x1].sum(axis=1).astype(np.float64)
    fifths = np.array_split(profile, 5)
    core = np.mean(np.concatenate(fifths[1:4]))
    edge = np.mean(np.concatenate((fifths[0], fifths[4])))
    return float(core / max(edge, 1e-6))


def measure_ink(ink: np.ndarray, dpi: float) -> PixelStats:
    """Text lines, characters, script and layout of an ink mask rendered at `dpi`."""
    ink_share = float(ink.mean()) if ink.size else 0.0
    if ink_share < BLANK_INK_SHARE:
        return BLANK_PIXELS
    rules_h = long_runs(ink, int(RULE_MIN_LENGTH_IN[0] * dpi), axis=1)
    rules_v = long_runs(ink, int(RULE_MIN_LENGTH_IN[1] * dpi), axis=0)
    text_ink = deskew(ink & ~rules_h & ~rules_v)
    leaves = xy_cut(text_ink, MIN_GUTTER_PT * dpi / 72)
    n_rules_h, n_rules_v = len(runs(rules_h.any(axis=1))), len(runs(rules_v.any(axis=0)))
    if not leaves:
        return replace(BLANK_PIXELS, dpi=dpi, ink_share=ink_share, rules_h=n_rules_h,
                       rules_v=n_rules_v)  # fmt: skip
    heights = np.array([y1 - y0 for y0, y1, _, _ in leaves], dtype=np.float64)
    widths = np.array([x1 - x0 for _, _, x0, x1 in leaves], dtype=np.float64)
    line_like = widths >= 1.5 * heights
    ref = float(np.median(heights[line_like] if line_like.any() else heights))

    lines: list[tuple[tuple[int, int, int, int], float]] = []  # (leaf, length in line heights)
    core_ratios = []
    for leaf, height, width in zip(leaves, heights, widths, strict=True):
        if height < 0.35 * ref or width < 0.35 * ref:
            continue  # punctuation-sized specks and rule remnants
        n_lines = max(1, round(height / ref)) if height > 1.35 * ref else 1
        line_height = height / n_lines
        if 0.55 * ref <= line_height <= 1.35 * ref:
            line_height = ref  # a body line without ascenders/descenders is not smaller type
        if n_lines > 3 and text_ink[leaf[0] : leaf[1], leaf[2] : leaf[3]].mean() > 0.35:
            continue  # a picture, not text
        lines.extend([(leaf, width / line_height)] * n_lines)
        if n_lines == 1 and 0.7 * ref <= height <= 1.3 * ref and width >= 8 * height:
            core_ratios.append(_core_ratio(text_ink, leaf))
    core_ratio = float(np.median(core_ratios)) if core_ratios else 0.0
    script = "cjk" if core_ratios and core_ratio < LATIN_CORE_RATIO else "latin"
    char_width = CHAR_WIDTH_PER_LINE_HEIGHT[script]
    boxes = [
        LineBox(x0, y0, x1, y1, round(length / char_width)) for (y0, y1, x0, x1), length in lines
    ]
    columns, table_rows = count_columns(boxes)
    return PixelStats(
        dpi=dpi,
        ink_share=ink_share,
        text_lines=len(lines),
        line_height_px=ref,
        est_chars=round(sum(length for _, length in lines) / char_width),
        script=script,
        core_ratio=core_ratio,
        columns=columns,
        table_rows=table_rows,
        rules_h=n_rules_h,
        rules_v=n_rules_v,
    )


def measure_page_pixels(page: pymupdf.Page, dpi: float = PIXEL_DPI) -> PixelStats:
    """Render `page` in low-resolution grayscale and measure its ink."""
    gray, rendered_dpi = render_gray(page, dpi)
    return measure_ink(binarize(gray), rendered_dpi)
