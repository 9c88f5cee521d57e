"""Text lines found in an ink mask by projection profiles: the skew of the lines and a
recursive XY-cut, used by the routing's pixel statistics (`tasks.pixel_stats`) and the scan
orientation check (`models.orientation`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Skew:
    """`degrees`: the shear slope (as an angle) of the mask's rows of ink, positive when lines
    run down to the right. `gain`: the sharpest row profile over the flattest in the sweep:
    high for lines, near 1 for a mask whose rows are not lines (text turned a quarter)."""

    degrees: float
    gain: float


def skew(ink: np.ndarray, max_degrees: float, sample: int | None = None) -> Skew:
    """The slope of the mask's text lines, within `max_degrees` either way: the shear whose row
    profile is sharpest (largest sum of squares), in 1-degree steps, then 0.1. `sample`: at
    most this many ink pixels, evenly spread, are weighed (enough to place the lines)."""
    ys, xs = np.nonzero(ink)
    if len(ys) == 0:
        return Skew(0.0, 1.0)
    if sample is not None and len(ys) > sample:
        keep = np.linspace(0, len(ys) - 1, sample).astype(np.int64)
        ys, xs = ys[keep], xs[keep]

    def sharpness(degrees: float) -> float:
        rows = ys - np.round(xs * np.tan(np.radians(degrees))).astype(np.int64)
        profile = np.bincount(rows - rows.min())
        return float(np.dot(profile, profile))

    coarse = {float(a): sharpness(a) for a in np.arange(-max_degrees, max_degrees + 0.5, 1.0)}
    best = max(coarse, key=coarse.__getitem__)
    fine = {float(a): sharpness(a) for a in np.arange(best - 1.0, best + 1.05, 0.1)}
    degrees = max(fine, key=fine.__getitem__)
    return Skew(degrees, fine[degrees] / max(min(coarse.values()), 1.0))


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


def long_runs(mask: np.ndarray, length: int, axis: int) -> np.ndarray:
    """Pixels that belong to a run of at least `length` ink pixels along `axis`.

    Erosion then dilation with a line of `length`, done by doubling shifts (log2(length) steps).
    """

    def shifted_and(a: np.ndarray, shift: int) -> np.ndarray:
        out = np.zeros_like(a)
        if axis == 1:
            out[:, :-shift] = a[:, :-shift] & a[:, shift:]
        else:
            out[:-shift, :] = a[:-shift, :] & a[shift:, :]
        return out

    def shifted_or(a: np.ndarray, shift: int) -> np.ndarray:
        out = a.copy()
        if axis == 1:
            out[:, shift:] |= a[:, :-shift]
        else:
            out[shift:, :] |= a[:-shift, :]
        return out

    if length < 2 or mask.shape[axis] <= length:
        return np.zeros_like(mask)
    eroded, covered = mask, 1
    while covered < length:
        step = min(covered, length - covered)
        eroded = shifted_and(eroded, step)
        covered += step
    dilated, covered = eroded, 1
    while covered < length:
        step = min(covered, length - covered)
        dilated = shifted_or(dilated, step)
        covered += step
    return dilated
