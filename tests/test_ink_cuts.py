"""The projection-profile primitives shared by the routing's pixel statistics and the scan
orientation check, on masks drawn here with known lines."""

from __future__ import annotations

import numpy as np
import pytest

from models.ink_cuts import skew, xy_cut


def lined_mask(degrees: float, lines: int = 12, width: int = 600) -> np.ndarray:
    """Text-like bands 8 px thick every 20 px, sloping `degrees` (down to the right when
    positive), broken into 'words'."""
    mask = np.zeros((lines * 20 + 80, width), dtype=bool)
    xs = np.arange(20, width - 20)
    for line in range(lines):
        words = (xs + 7 * line) % 30 < 24  # 6 px word spaces, staggered from line to line
        ys = 40 + line * 20 + np.round((xs - 20) * np.tan(np.radians(degrees))).astype(int)
        for thickness in range(8):
            mask[ys[words] + thickness, xs[words]] = True
    return mask


@pytest.mark.parametrize("degrees", [-3.0, -1.2, 0.0, 0.7, 2.5])
def test_skew_finds_the_slope_of_the_lines(degrees: float) -> None:
    found = skew(lined_mask(degrees), max_degrees=5.0)
    assert found.degrees == pytest.approx(degrees, abs=0.15)


def test_lines_turned_a_quarter_show_little_gain() -> None:
    """Rows of a mask whose lines run down the page are no lines: the sweep barely changes the
    profile, which is how the orientation check tells the lines' axis."""
    mask = lined_mask(1.0)
    assert skew(mask, 5.0).gain > 2.0 > 1.2 > skew(mask.T, 5.0).gain


def test_a_sample_of_the_ink_gives_the_same_slope() -> None:
    mask = lined_mask(1.8)
    assert skew(mask, 5.0, sample=2_000).degrees == pytest.approx(1.8, abs=0.15)


def test_xy_cut_gives_each_level_line_as_a_leaf() -> None:
    leaves = xy_cut(lined_mask(0.0), min_gutter_px=12)
    assert len(leaves) == 12
    assert all(y1 - y0 == 8 and x1 - x0 > 500 for y0, y1, x0, x1 in leaves)
