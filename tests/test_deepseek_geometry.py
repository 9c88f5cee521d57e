"""DeepSeek-OCR page geometry: tile grids, placeholder counts and valid-token accounting."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from infra.vocabulary import Mode
from models.deepseek_ocr.geometry import (
    TILE_GRID_CANDIDATES,
    InvalidPageSizeError,
    count_placeholders,
    count_valid_vision_tokens,
    page_geometry,
    tile_grid,
)

A4_PAGES = [(1191, 1684), (1654, 2339), (2480, 3508)]  # A4 at 144, 200 and 300 dpi


def _official_style_grid(width: int, height: int) -> tuple[int, int]:
    """The official search written independently: candidates built as a Python set of
    (i, j) with 2 <= i*j <= 9, sorted by i*j (stable, so set order breaks ties)."""
    candidates = sorted(
        {(i, j) for n in range(2, 10) for i in range(1, n + 1) for j in range(1, n + 1)
         if 2 <= i * j <= 9},
        key=lambda grid: grid[0] * grid[1],
    )  # fmt: skip
    best, best_diff = (1, 1), math.inf
    for i, j in candidates:
        diff = abs(width / height - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * 640 * 640 * i * j:
            best = (i, j)
    return best


@pytest.mark.parametrize(
    ("mode", "expected"),
    [(Mode.TINY, 73), (Mode.SMALL, 111), (Mode.BASE, 273), (Mode.LARGE, 421)],
)
def test_native_modes_have_fixed_placeholder_counts(mode: Mode, expected: int) -> None:
    for width, height in [(1240, 1754), (800, 600), (100, 3000), (640, 640)]:
        assert count_placeholders(mode, width, height) == expected
        assert page_geometry(mode, width, height).tile_grid == (1, 1)


@pytest.mark.parametrize(("width", "height"), A4_PAGES)
def test_a4_page_in_gundam_is_two_by_three_tiles_and_903_placeholders(
    width: int, height: int
) -> None:
    assert tile_grid(width, height) == (2, 3)
    assert count_placeholders(Mode.GUNDAM, width, height) == 630 + 273


def test_wide_slide_gets_four_by_two_tiles() -> None:
    assert tile_grid(1920, 1080) == (4, 2)
    assert count_placeholders(Mode.GUNDAM, 1920, 1080) == 20 * 41 + 273


def test_small_page_with_one_side_over_640_is_tiled() -> None:
    assert tile_grid(600, 800) == (2, 3)
    assert tile_grid(641, 100) == (6, 1)


@pytest.mark.parametrize(("width", "height"), [(640, 640), (500, 300), (1, 640), (640, 1)])
def test_pages_within_640_get_no_tiles_in_gundam(width: int, height: int) -> None:
    geometry = page_geometry(Mode.GUNDAM, width, height)
    assert geometry.tile_grid == (1, 1)
    assert geometry.n_tiles == 0
    assert geometry.n_placeholders == 273


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        # Square: 2x2 and 3x3 tie; 3x3 only above half of 9 tiles' area (1,843,200 px).
        (1357, 1357, (2, 2)),
        (1358, 1358, (3, 3)),
        # Aspect 1.25 sits exactly between 2x2 (1.0) and 3x2 (1.5): the area decides.
        (1000, 800, (2, 2)),
        (1250, 1000, (3, 2)),
        (2000, 1600, (3, 3)),
    ],
)
def test_exact_aspect_ties_break_on_image_area(
    width: int, height: int, expected: tuple[int, int]
) -> None:
    assert tile_grid(width, height) == expected


def test_tile_grid_matches_the_official_search_on_a_size_sweep() -> None:
    for width in range(641, 4000, 53):
        for height in range(200, 4000, 61):
            assert tile_grid(width, height) == _official_style_grid(width, height), (width, height)
            assert tile_grid(height, width) == _official_style_grid(height, width), (height, width)


def test_gundam_placeholders_follow_the_stitched_grid_formula() -> None:
    for width, height in [(3000, 700), (700, 3000), (2000, 2000), (5000, 400)]:
        w_tiles, h_tiles = tile_grid(width, height)
        assert 2 <= w_tiles * h_tiles <= 9
        expected = (10 * h_tiles) * (10 * w_tiles + 1) + 273
        assert count_placeholders(Mode.GUNDAM, width, height) == expected


@pytest.mark.parametrize(
    ("mode", "width", "height", "expected"),
    [
        # Values recorded from the official test_compress on the parity pages.
        (Mode.TINY, 1240, 1754, 64),
        (Mode.BASE, 1240, 1754, 180),
        (Mode.GUNDAM, 1240, 1754, 780),
        (Mode.SMALL, 800, 600, 100),
        (Mode.GUNDAM, 800, 600, 792),
        # Derived from the same rules: letterboxed views count their page share.
        (Mode.LARGE, 1240, 1754, 282),
        (Mode.BASE, 800, 600, 192),
        (Mode.BASE, 1000, 1000, 256),
        (Mode.GUNDAM, 600, 500, 213),
    ],
)
def test_valid_vision_tokens_match_test_compress(
    mode: Mode, width: int, height: int, expected: int
) -> None:
    assert count_valid_vision_tokens(mode, width, height) == expected


def test_modes_accept_their_string_values() -> None:
    assert count_placeholders("gundam", 1240, 1754) == 903  # type: ignore[arg-type]


@pytest.mark.parametrize(("width", "height"), [(0, 100), (100, 0), (-5, 10)])
def test_empty_page_sizes_are_rejected(width: int, height: int) -> None:
    with pytest.raises(InvalidPageSizeError):
        page_geometry(Mode.BASE, width, height)
    with pytest.raises(InvalidPageSizeError):
        tile_grid(width, height)


def test_geometry_imports_neither_torch_nor_pillow() -> None:
    code = (
        "import sys, models.deepseek_ocr.geometry; "
        "assert 'torch' not in sys.modules and 'PIL' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


@pytest.mark.parametrize("max_tiles", [6, 4, 2])
def test_a_crop_cap_keeps_every_grid_within_it(max_tiles: int) -> None:
    """Small cards cap Gundam's crops (the official config advises 6); the grid is still the
    closest aspect ratio among the allowed ones."""
    for width, height in [(640 * 9, 700), (700, 640 * 9), (1920, 1920), (3000, 1000), (1240, 1754)]:
        w_tiles, h_tiles = tile_grid(width, height, max_tiles)
        assert w_tiles * h_tiles <= max_tiles
        allowed = [(w, h) for w, h in TILE_GRID_CANDIDATES if w * h <= max_tiles]
        best = min(abs(width / height - w / h) for w, h in allowed)
        assert abs(width / height - w_tiles / h_tiles) == best


def test_the_cap_reaches_the_page_geometry_and_its_placeholders() -> None:
    capped = page_geometry(Mode.GUNDAM, 640 * 9, 700, max_tiles=6)
    uncapped = page_geometry(Mode.GUNDAM, 640 * 9, 700)
    assert capped.n_tiles <= 6 < uncapped.n_tiles
    assert capped.n_placeholders < uncapped.n_placeholders
