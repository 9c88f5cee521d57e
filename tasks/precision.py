"""Expected OCR precision as a function of compression (text tokens / valid vision tokens).

Built from the paper's Fox table (DeepSeek-OCR, Table 2; port notes §18.2): 14 measurements,
two modes (64 and 100 vision tokens), 600-1300 text tokens per page. Precision must not rise with
compression, but the table's small bins do (11.8x: 93.8% after 11.3x: 89.8%), so the points are
made monotone by pooling adjacent violators weighted by their page counts (isotonic regression),
then interpolated linearly. Below the smallest measured compression precision stays at the best
measured value; above the largest it falls along the last segment's slope.
"""

from __future__ import annotations

import bisect
import itertools

# (compression, precision, pages) from Fox Table 2, both the 64- and 100-token columns.
FOX_MEASUREMENTS: tuple[tuple[float, float, int], ...] = (
    (10.5, 0.965, 7), (11.8, 0.938, 28), (13.2, 0.838, 28), (15.1, 0.859, 14),
    (16.5, 0.793, 11), (17.7, 0.764, 8), (19.7, 0.591, 4),
    (6.7, 0.985, 7), (7.5, 0.973, 28), (8.5, 0.968, 28), (9.7, 0.968, 14),
    (10.6, 0.915, 11), (11.3, 0.898, 8), (12.6, 0.871, 4),
)  # fmt: skip


def _monotone_decreasing(points: list[tuple[float, float, int]]) -> list[tuple[float, float]]:
    """Pool-adjacent-violators: the weighted least-squares non-increasing fit, per point."""
    blocks: list[list[float]] = []  # [precision, weight, count]
    for _, precision, weight in points:
        blocks.append([precision, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            p2, w2, n2 = blocks.pop()
            p1, w1, n1 = blocks.pop()
            blocks.append([(p1 * w1 + p2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    fitted = [precision for precision, _, count in blocks for _ in range(int(count))]
    return [(point[0], value) for point, value in zip(points, fitted, strict=True)]


PRECISION_CURVE: tuple[tuple[float, float], ...] = tuple(
    _monotone_decreasing(sorted(FOX_MEASUREMENTS))
)
_COMPRESSIONS = [c for c, _ in PRECISION_CURVE]


def expected_precision(compression: float) -> float:
    """Expected precision at `compression` text tokens per vision token (0..1)."""
    if compression <= _COMPRESSIONS[0]:
        return PRECISION_CURVE[0][1]
    index = min(bisect.bisect_left(_COMPRESSIONS, compression), len(_COMPRESSIONS) - 1)
    (c0, p0), (c1, p1) = PRECISION_CURVE[index - 1], PRECISION_CURVE[index]
    precision = p0 + (p1 - p0) * (compression - c0) / (c1 - c0)
    return min(PRECISION_CURVE[0][1], max(0.0, precision))


def max_compression(precision_target: float) -> float:
    """The largest compression whose expected precision still meets `precision_target`
    (0 when even the least compressed measurement falls short)."""
    if precision_target > PRECISION_CURVE[0][1]:
        return 0.0
    for (c0, p0), (c1, p1) in itertools.pairwise(PRECISION_CURVE):
        if p1 < precision_target <= p0:
            return c0 + (c1 - c0) * (p0 - precision_target) / (p0 - p1) if p0 > p1 else c0
    (c0, p0), (c1, p1) = PRECISION_CURVE[-2:]
    slope = (p1 - p0) / (c1 - c0)
    return c1 + (precision_target - p1) / slope if slope < 0 else c1
