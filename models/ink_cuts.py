"""Text lines cut out of an ink mask by projection profiles: recursive XY-cut, used by the
routing's pixel statistics (`tasks.pixel_stats`) and the scan orientation check
(`models.orientation`)."""

from __future__ import annotations

import numpy as np


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of True in a 1-D mask."""
    edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def merge_runs(spans: list[tuple[int, int]], max_gap: float) -> list[tuple[int, int]]:
    """`spans` (ascending) with gaps under `max_gap` closed."""
    merged = [spans[0]]
    for start, end in spans[1:]:
        if start - merged[-1][1] < max_gap:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def xy_cut(ink: np.ndarray, min_gutter_px: float) -> list[tuple[int, int, int, int]]:
    """Leaves (y0, y1, x0, x1) of a recursive XY-cut: regions with no empty row and no gutter.

    Rows split wherever a row is empty; columns only at gaps of at least `min_gutter_px`, so the
    word spaces of body text never split a line (those of large titles may, which costs little).
    """
    leaves = []
    stack = [(0, ink.shape[0], 0, ink.shape[1])]
    while stack:
        y0, y1, x0, x1 = stack.pop()
        row_runs = runs(ink[y0:y1, x0:x1].any(axis=1))
        if not row_runs:
            continue
        if len(row_runs) > 1:
            stack.extend((y0 + a, y0 + b, x0, x1) for a, b in row_runs)
            continue
        y0, y1 = y0 + row_runs[0][0], y0 + row_runs[0][1]
        col_runs = merge_runs(runs(ink[y0:y1, x0:x1].any(axis=0)), min_gutter_px)
        if len(col_runs) > 1:
            stack.extend((y0, y1, x0 + a, x0 + b) for a, b in col_runs)
            continue
        leaves.append((y0, y1, x0 + col_runs[0][0], x0 + col_runs[0][1]))
    return leaves
