"""Boxes on a page, shared by the CPU engines: reading order by recursive XY-cut, and the
0..999 bins DeepSeek-OCR uses, so every engine's blocks carry comparable boxes.

A region is split into columns whenever a column gutter runs down all of it, and each column
is read top to bottom before the next; only a region with no gutter is split across, at its
widest empty row. Preferring the gutter matters on a scanned two-column page whose paragraphs
line up across the columns: cutting at the row gaps between them first read the page
paragraph by paragraph, left and right interleaved. A full-width element (a title, a heading
between two column sections) crosses the gutter: the region is first cut across above and
below each such element, so it stays above the columns it precedes, even where skew leaves no
clean empty row beside it.

On a scan, specks and stray marks in the gutter would bridge it too: boxes narrower than
`MAX_NOISE_WIDTH` line heights are left out while looking for a gutter and then go to the
side their centre falls on. Right-to-left pages (Arabic, Hebrew) read their columns and the
boxes of a row from the right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median

Box = tuple[float, float, float, float]  # x0, y0, x1, y1

MIN_COLUMN_SHARE = 0.25
"""A vertical cut counts as a column break only if both sides are at least this share of the
region's width (a narrow margin note is not a column)."""
MIN_COLUMN_LINE_WIDTH = 8
"""... and only if the boxes on both sides are typically this many line heights wide, as lines
of running text are. Table cells and receipt prices are short, so tables and receipts are read
row by row instead of cell column by cell column."""
MAX_SPANNING_SHARE = 0.2
"""At most this share of a region's boxes may cross its gutter (titles, headings, a figure
caption); more, and the region is one column with a few short lines."""
MAX_NOISE_WIDTH = 1.5
"""A box narrower than this many line heights (a speck, a bullet, a stray digit) does not
count when looking for a gutter."""


def reading_order(boxes: Sequence[Box], line_height: float, *, rtl: bool = False) -> list[int]:
    """Indices of `boxes` in reading order.

    `line_height` is the body text's line height in the boxes' units: a vertical gap narrower
    than half of it is word spacing, not a gutter, and boxes within half of it share a row.
    `rtl`: the page is written right to left, so its columns and rows are read from the right.
    """
    return _order(list(range(len(boxes))), boxes, max(line_height, 1e-6), rtl)


def _order(indices: list[int], boxes: Sequence[Box], line_height: float, rtl: bool) -> list[int]:
    if len(indices) <= 1:
        return indices
    gutter = _gutter(indices, boxes, line_height)
    if gutter is not None and gutter.spanning:
        parts = _cut_at_spanning(indices, boxes, gutter.spanning)
    elif gutter is not None:
        left, right = _split_by_centre(indices, boxes, at=gutter.x)
        parts = [right, left] if rtl else [left, right]
    elif (horizontal := _widest_gap(indices, boxes, axis=1)) is not None:
        parts = list(_split(indices, boxes, axis=1, at=horizontal[1]))
    else:
        return _rows(indices, boxes, line_height, rtl)
    return [i for part in parts for i in _order(part, boxes, line_height, rtl)]


def _widest_gap(indices: list[int], boxes: Sequence[Box], axis: int) -> tuple[float, float] | None:
    """(width, middle) of the widest empty interval between the boxes' projections on an axis
    (0: x, 1: y), or None when the projections overlap into one run."""
    spans = sorted((boxes[i][axis], boxes[i][axis + 2]) for i in indices)
    best: tuple[float, float] | None = None
    reach = spans[0][1]
    for start, end in spans[1:]:
        if start > reach and (best is None or start - reach > best[0]):
            best = (start - reach, (start + reach) / 2)
        reach = max(reach, end)
    return best


@dataclass(frozen=True)
class _Gutter:
    x: float  # where the gutter runs
    spanning: list[int]  # boxes that cross it (full-width titles and headings)


def _gutter(indices: list[int], boxes: Sequence[Box], line_height: float) -> _Gutter | None:
    """The column gutter of a region, or None when the region is one column (or a table).

    Every position across the middle of the region is tried; the one crossed by the fewest
    boxes wins, and counts as a gutter if the boxes beside it are columns of running text and
    those crossing it are few enough to be headings (`MAX_SPANNING_SHARE`).
    """
    text = [i for i in indices if boxes[i][2] - boxes[i][0] >= line_height * MAX_NOISE_WIDTH]
    if len(text) < 2:
        return None
    left = min(boxes[i][0] for i in text)
    right = max(boxes[i][2] for i in text)
    low, high = left + (right - left) * MIN_COLUMN_SHARE, right - (right - left) * MIN_COLUMN_SHARE
    best: tuple[int, float, float] | None = None  # (boxes crossing, -gap width, x)
    for x in sorted({boxes[i][2] for i in text} | {boxes[i][0] for i in text}):
        if not low <= x <= high:
            continue
        crossing = [i for i in text if boxes[i][0] < x < boxes[i][2]]
        beside = [i for i in text if not boxes[i][0] < x < boxes[i][2]]
        ends_before = [boxes[i][2] for i in beside if boxes[i][2] <= x]
        starts_after = [boxes[i][0] for i in beside if boxes[i][0] >= x]
        if not ends_before or not starts_after:
            continue
        gap = min(starts_after) - max(ends_before)
        candidate = (len(crossing), -gap, (min(starts_after) + max(ends_before)) / 2)
        if gap >= line_height * 0.5 and (best is None or candidate < best):
            best = candidate
    if best is None or best[0] > len(text) * MAX_SPANNING_SHARE:
        return None
    x = best[2]
    spanning = [i for i in text if boxes[i][0] < x < boxes[i][2]]
    beside = [i for i in text if i not in spanning]
    for side in _split(beside, boxes, axis=0, at=x):
        if len(side) < 2 or _median_width(side, boxes) < line_height * MIN_COLUMN_LINE_WIDTH:
            return None
    return _Gutter(x=x, spanning=sorted(spanning, key=lambda i: boxes[i][1]))


def _median_width(indices: list[int], boxes: Sequence[Box]) -> float:
    return median(boxes[i][2] - boxes[i][0] for i in indices)


def _cut_at_spanning(
    indices: list[int], boxes: Sequence[Box], spanning: list[int]
) -> list[list[int]]:
    """The region cut across at each spanning box: what lies above it (by vertical centre),
    the box itself, and so on down to what lies below the last."""
    parts: list[list[int]] = []
    rest = [i for i in indices if i not in spanning]
    for box in spanning:
        centre = (boxes[box][1] + boxes[box][3]) / 2
        parts.append([i for i in rest if (boxes[i][1] + boxes[i][3]) / 2 < centre])
        parts.append([box])
        rest = [i for i in rest if (boxes[i][1] + boxes[i][3]) / 2 >= centre]
    parts.append(rest)
    return [part for part in parts if part]


def _split(
    indices: list[int], boxes: Sequence[Box], axis: int, at: float
) -> tuple[list[int], list[int]]:
    first = [i for i in indices if boxes[i][axis + 2] <= at]
    second = [i for i in indices if boxes[i][axis + 2] > at]
    return first, second


def _split_by_centre(
    indices: list[int], boxes: Sequence[Box], at: float
) -> tuple[list[int], list[int]]:
    """Left and right of a gutter; a speck that sat in it goes to the side of its centre."""
    left = [i for i in indices if (boxes[i][0] + boxes[i][2]) / 2 <= at]
    right = [i for i in indices if (boxes[i][0] + boxes[i][2]) / 2 > at]
    return left, right


def _rows(indices: list[int], boxes: Sequence[Box], line_height: float, rtl: bool) -> list[int]:
    """Boxes with no clean cut between them: group into rows by vertical centre, then in
    writing direction within a row."""
    by_centre = sorted(indices, key=lambda i: (boxes[i][1] + boxes[i][3]) / 2)
    rows: list[list[int]] = []
    row_centre = float("-inf")
    for i in by_centre:
        centre = (boxes[i][1] + boxes[i][3]) / 2
        if centre - row_centre > line_height * 0.5:
            rows.append([])
            row_centre = centre
        rows[-1].append(i)
    if rtl:
        return [i for row in rows for i in sorted(row, key=lambda i: -boxes[i][2])]
    return [i for row in rows for i in sorted(row, key=lambda i: boxes[i][0])]


def to_bins(box: Box, width: float, height: float) -> list[int]:
    """Page coordinates to the 0..999 grid relative to the page size."""
    scales = (width, height, width, height)
    return [min(999, max(0, round(v / scale * 999))) for v, scale in zip(box, scales, strict=True)]
