"""DeepSeek-OCR page geometry: view sizes, Gundam tile grids and vision-token counts per mode.

Pure Python on purpose (no torch, no Pillow): the CPU router calls these for every page to price
a mode before any image is rendered, so they must stay cheap and import-light. The numbers follow
the official `infer()` exactly (port notes §2, §10, §12); the processor builds its views from the
same functions, so routing and inference can never disagree on a count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from infra.vocabulary import Mode

# Tiling is hard-coded to 640 in the official code, independent of a mode's image_size.
TILE_SIZE = 640
# SAM patch 16, then two stride-2 convs: one vision query per 64x64 pixels.
PATCH_SIZE = 16
DOWNSAMPLE = 4

# Candidate grids (w_tiles, h_tiles) for 2..9 tiles in the order the official search visits them:
# sorted by tile count, ties in CPython's iteration order of the set the official code builds.
# The order matters because an exact aspect-ratio tie keeps the earlier grid unless the image is
# large (see `tile_grid`).
TILE_GRID_CANDIDATES: tuple[tuple[int, int], ...] = (
    (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1),
    (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1),
)  # fmt: skip


# The official search allows up to 9 tiles; its vLLM config advises 6 where GPU memory is small.
MAX_TILES = 9
SMALL_GPU_MAX_TILES = 6


class InvalidPageSizeError(ValueError):
    """A page size that cannot be turned into views (zero or negative side)."""


@dataclass(frozen=True)
class ModeGeometry:
    """The official `infer()` arguments of one mode.

    `base_size` is the global view's side, `image_size` the side used for native views' token
    count (and for Gundam tiles), `crop` whether the page is tiled (Gundam).
    """

    base_size: int
    image_size: int
    crop: bool

    @property
    def squashes(self) -> bool:
        """Whether the global view is a plain resize to a square (Tiny, Small) rather than a
        letterbox that keeps the aspect ratio (Base, Large, Gundam's global view)."""
        return not self.crop and self.image_size <= TILE_SIZE


MODE_GEOMETRY: dict[Mode, ModeGeometry] = {
    Mode.TINY: ModeGeometry(base_size=512, image_size=512, crop=False),
    Mode.SMALL: ModeGeometry(base_size=640, image_size=640, crop=False),
    Mode.BASE: ModeGeometry(base_size=1024, image_size=1024, crop=False),
    Mode.LARGE: ModeGeometry(base_size=1280, image_size=1280, crop=False),
    Mode.GUNDAM: ModeGeometry(base_size=1024, image_size=640, crop=True),
}


def view_sides() -> list[int]:
    """Every view side the vision encoder is given: each mode's global view and tile sides."""
    return sorted({side for g in MODE_GEOMETRY.values() for side in (g.base_size, g.image_size)})


@dataclass(frozen=True)
class PageGeometry:
    """Everything about one page in one mode that does not need its pixels.

    `tile_grid` is `(w_tiles, h_tiles)`, `(1, 1)` when the page is not tiled (the official
    `images_spatial_crop`).
    """

    mode: Mode
    width: int
    height: int
    tile_grid: tuple[int, int]
    n_placeholders: int
    valid_vision_tokens: int

    @property
    def n_tiles(self) -> int:
        return 0 if self.tile_grid == (1, 1) else self.tile_grid[0] * self.tile_grid[1]


def queries_per_side(view_size: int) -> int:
    """Vision queries along one side of a square view of `view_size` pixels (8 for 512)."""
    return math.ceil((view_size // PATCH_SIZE) / DOWNSAMPLE)


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidPageSizeError(f"page size must be positive, got {width}x{height}")


def tile_grid(width: int, height: int, max_tiles: int = MAX_TILES) -> tuple[int, int]:
    """The Gundam tile grid `(w_tiles, h_tiles)` of a `width` x `height` image.

    `(1, 1)` (no tiles) when both sides are <= 640. Otherwise the candidate of at most
    `max_tiles` tiles whose aspect ratio is closest to the image's; on an exact tie a later
    candidate wins only if the image area exceeds half the candidate's tiled area (so a large
    square page gets 3x3 rather than 2x2).
    """
    _check_size(width, height)
    if width <= TILE_SIZE and height <= TILE_SIZE:
        return (1, 1)
    aspect_ratio = width / height
    area = width * height
    best_grid = (1, 1)
    best_diff = math.inf
    for w_tiles, h_tiles in TILE_GRID_CANDIDATES:
        if w_tiles * h_tiles > max_tiles:
            continue
        diff = abs(aspect_ratio - w_tiles / h_tiles)
        if diff < best_diff:
            best_grid, best_diff = (w_tiles, h_tiles), diff
        elif diff == best_diff and area > 0.5 * TILE_SIZE * TILE_SIZE * w_tiles * h_tiles:
            best_grid = (w_tiles, h_tiles)
    return best_grid


def _page_tile_grid(
    geometry: ModeGeometry, width: int, height: int, max_tiles: int = MAX_TILES
) -> tuple[int, int]:
    return tile_grid(width, height, max_tiles) if geometry.crop else (1, 1)


def _placeholders(geometry: ModeGeometry, grid: tuple[int, int]) -> int:
    # Global view: g rows of g queries + one newline each, then one view separator.
    global_side = queries_per_side(geometry.base_size)
    count = global_side * (global_side + 1) + 1
    if grid != (1, 1):
        # Tiles are stitched into one (q*h) x (q*w) map with one newline per stitched row.
        tile_side = queries_per_side(geometry.image_size)
        w_tiles, h_tiles = grid
        count += (tile_side * h_tiles) * (tile_side * w_tiles + 1)
    return count


def _valid_tokens(geometry: ModeGeometry, grid: tuple[int, int], width: int, height: int) -> int:
    # The official `test_compress`: grid queries only (no newlines/separator); a letterboxed
    # global view counts the share of its area the page covers, truncated with int().
    # ratio is written as the official does (1 - (max-min)/max) to round identically.
    global_queries = queries_per_side(geometry.base_size) ** 2
    if geometry.squashes:
        valid = global_queries
    else:
        ratio = 1 - (max(width, height) - min(width, height)) / max(width, height)
        valid = int(global_queries * ratio)
    if grid != (1, 1):
        valid += grid[0] * grid[1] * queries_per_side(geometry.image_size) ** 2
    return valid


def page_geometry(mode: Mode, width: int, height: int, max_tiles: int = MAX_TILES) -> PageGeometry:
    """Tile grid, placeholder count and valid vision tokens of a page in `mode`.

    `width`/`height` are the image's pixel size after EXIF transposition; `max_tiles` caps
    Gundam's crops (`SMALL_GPU_MAX_TILES` on small cards).
    """
    _check_size(width, height)
    geometry = MODE_GEOMETRY[Mode(mode)]
    grid = _page_tile_grid(geometry, width, height, max_tiles)
    return PageGeometry(
        mode=Mode(mode),
        width=width,
        height=height,
        tile_grid=grid,
        n_placeholders=_placeholders(geometry, grid),
        valid_vision_tokens=_valid_tokens(geometry, grid, width, height),
    )


def count_placeholders(mode: Mode, width: int, height: int) -> int:
    """`<image>` placeholders in the prompt: 73 / 111 / 273 / 421 / (10h)(10w+1)+273."""
    geometry = MODE_GEOMETRY[Mode(mode)]
    _check_size(width, height)
    return _placeholders(geometry, _page_tile_grid(geometry, width, height))


def count_valid_vision_tokens(mode: Mode, width: int, height: int) -> int:
    """Vision tokens that carry page content, as the official `test_compress` counts them."""
    geometry = MODE_GEOMETRY[Mode(mode)]
    _check_size(width, height)
    return _valid_tokens(geometry, _page_tile_grid(geometry, width, height), width, height)
