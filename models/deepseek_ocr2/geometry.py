"""DeepSeek-OCR 2 page geometry without pixels: crops and vision tokens per budget.

OCR-2 has one dynamic mode: a 1024-px global view (16 x 16 = 256 queries), plus 0 or 2-6 local
768-px crops (12 x 12 = 144 queries each) when a side exceeds 768 px, plus one view separator.
The crop grid is transformers' `get_optimal_tiled_canvas` (aspect ratio closest to the page's,
more crops on an exact tie while the page covers over half their area), restated here so the
router and the cost report price pages without importing transformers; a test checks it against
transformers' own function.

The pipeline's `Mode` ladder names the budgets, cheapest first, so requests, the GPU queue,
escalation (`Mode.next_up`) and the stored `mode` column carry them unchanged: each rung caps
the crops the tiling may use (`CROP_CAPS`). Tiny is the global view alone; Gundam is the
official setting (up to 6 crops). A cap only bounds the crops: a page that the tiling gives
2 crops under every cap costs the same from Small to Large, and the router keeps the cheapest.
"""

from __future__ import annotations

import math
from functools import lru_cache

from infra.vocabulary import Mode

GLOBAL_SIZE = 1024
TILE_SIZE = 768
PATCH_SIZE = 16
DOWNSAMPLE = 4
MIN_CROPS = 2
MAX_CROPS = 6
CROP_CAPS: dict[Mode, int] = {
    Mode.TINY: 0,
    Mode.SMALL: 2,
    Mode.BASE: 3,
    Mode.LARGE: 4,
    Mode.GUNDAM: MAX_CROPS,
}


def queries(view_size: int) -> int:
    """Vision queries of a square view: 256 at 1024 px, 144 at 768 px."""
    per_side = math.ceil(view_size / PATCH_SIZE / DOWNSAMPLE)
    return per_side * per_side


@lru_cache(maxsize=16)
def _grids(max_crops: int) -> tuple[tuple[int, int], ...]:
    """Candidate `(columns, rows)` grids in transformers' order: by crop count, then columns."""
    grids = [
        (columns, rows)
        for columns in range(1, max_crops + 1)
        for rows in range(1, max_crops + 1)
        if MIN_CROPS <= columns * rows <= max_crops
    ]
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def crop_grid(width: int, height: int, max_crops: int = MAX_CROPS) -> tuple[int, int] | None:
    """The `(columns, rows)` crop grid of a `width` x `height` image, None without crops (both
    sides <= 768 px, or a cap below 2)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"page size must be positive, got {width}x{height}")
    if max(width, height) <= TILE_SIZE or max_crops < MIN_CROPS:
        return None
    aspect, area = width / height, width * height
    best, best_diff = None, math.inf
    for columns, rows in _grids(max_crops):
        diff = abs(aspect - columns / rows)
        if diff < best_diff:
            best, best_diff = (columns, rows), diff
        elif diff == best_diff and area > 0.5 * TILE_SIZE * TILE_SIZE * columns * rows:
            best = (columns, rows)
    return best


def crop_count(width: int, height: int, max_crops: int = MAX_CROPS) -> int:
    grid = crop_grid(width, height, max_crops)
    return grid[0] * grid[1] if grid else 0


def placeholders(num_crops: int) -> int:
    """`<image>` placeholders of a page: global queries, crop queries, the view separator."""
    return queries(GLOBAL_SIZE) + queries(TILE_SIZE) * num_crops + 1


def mode_crops(mode: Mode | str, width: int, height: int) -> int:
    """Crops of a page read in `mode` (the rung's cap applied to the tiling)."""
    return crop_count(width, height, CROP_CAPS[Mode(mode)])


def count_placeholders(mode: Mode | str, width: int, height: int) -> int:
    """Vision tokens of a page in `mode`: 257 + 144 per crop (every one is valid: OCR-2 pads
    its global view but encodes the padding as queries like the rest)."""
    return placeholders(mode_crops(mode, width, height))


__all__ = [
    "CROP_CAPS",
    "GLOBAL_SIZE",
    "MAX_CROPS",
    "MIN_CROPS",
    "TILE_SIZE",
    "count_placeholders",
    "crop_count",
    "crop_grid",
    "mode_crops",
    "placeholders",
    "queries",
]
