"""Boxes on a page, shared by the CPU engines: reading order by recursive XY-cut, and the
0..999 bins DeepSeek-OCR uses, so every engine's blocks carry comparable boxes.

A region is split at its widest empty gap, across or down the page, and each part is ordered
the same way: top part before bottom, left column before right. Splitting at the widest gap
first (rather than at every gap) matters on a two-column page under a full-width title: the
title is cut off first, then the column gutter (wider than any paragraph gap) separates the
columns, so paragraphs that happen to line up across columns are not interleaved.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import median

Box = tuple[float, float, float, float]  # x0, y0, x1, y1

MIN_COLUMN_SHARE = 0.25
"""A vertical cut counts as a column break only if both sides are at least this share of the
region's width (a narrow margin note is not a column)."""
MIN_COLUMN_LINE_WIDTH = 8
"""... and only if the boxes on both sides are typically this many line heights wide, as lines
of running text are. Table cells and receipt prices are short, so tables and receipts are read
row by row instead of cell column by cell column."""


def reading_order(boxes: Sequence[Box], line_height: float) -> list[int]:
    """Indices of `boxes` in reading order.

    `line_height` is the body text's line height in the boxes' units: a vertical gap narrower
    than half of it is word spacing, not a gutter, and boxes within half of it share a row.
    """
    return _order(list(range(len(boxes))), boxes, max(line_height, 1e-6))


def _order(indices: list[int], boxes: Sequence[Box], line_height: float) -> list[int]:
    if len(indices) <= 1:
        return indices
    horizontal = _widest_gap(indices, boxes, axis=1)
    vertical = _column_gap(indices, boxes, line_height)
    if vertical is not None and (horizontal is None or vertical[0] >= horizontal[0]):
        first, second = _split(indices, boxes, axis=0, at=vertical[1])
    elif horizontal is not None:
        first, second = _split(indices, boxes, axis=1, at=horizontal[1])
    else:
        return _rows(indices, boxes, line_height)
    return _order(first, boxes, line_height) + _order(second, boxes, line_height)


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


def _column_gap(
    indices: list[int], boxes: Sequence[Box], line_height: float
) -> tuple[float, float] | None:
    gap = _widest_gap(indices, boxes, axis=0)
    if gap is None or gap[0] < line_height * 0.5:
        return None
    left = min(boxes[i][0] for i in indices)
    right = max(boxes[i][2] for i in indices)
    width = right - left
    if min(gap[1] - left, right - gap[1]) < width * MIN_COLUMN_SHARE:
        return None
    for side in _split(indices, boxes, axis=0, at=gap[1]):
        if median(boxes[i][2] - boxes[i][0] for i in side) < line_height * MIN_COLUMN_LINE_WIDTH:
            return None
    return gap


def _split(
    indices: list[int], boxes: Sequence[Box], axis: int, at: float
) -> tuple[list[int], list[int]]:
    first = [i for i in indices if boxes[i][axis + 2] <= at]
    second = [i for i in indices if boxes[i][axis + 2] > at]
    return first, second


def _rows(indices: list[int], boxes: Sequence[Box], line_height: float) -> list[int]:
    """Boxes with no clean cut between them: group into rows by vertical centre, then left to
    right within a row."""
    by_centre = sorted(indices, key=lambda i: (boxes[i][1] + boxes[i][3]) / 2)
    rows: list[list[int]] = []
    row_centre = float("-inf")
    for i in by_centre:
        centre = (boxes[i][1] + boxes[i][3]) / 2
        if centre - row_centre > line_height * 0.5:
            rows.append([])
            row_centre = centre
        rows[-1].append(i)
    return [i for row in rows for i in sorted(row, key=lambda i: boxes[i][0])]


def to_bins(box: Box, width: float, height: float) -> list[int]:
    """Page coordinates to the 0..999 grid relative to the page size."""
    scales = (width, height, width, height)
    return [min(999, max(0, round(v / scale * 999))) for v, scale in zip(box, scales, strict=True)]
