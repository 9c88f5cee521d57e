"""Column and table-row structure from line boxes, shared by the text layer and the pixels."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

MIN_COLUMN_SHARE = 0.35  # the column count is the largest count this share of text bands reach
MAX_CELL_CHARS = 10  # a band of >= 3 side-by-side pieces this short is a table row


@dataclass(frozen=True)
class LineBox:
    """A text line's box (any unit) and its non-whitespace characters."""

    x0: float
    y0: float
    x1: float
    y1: float
    chars: int


def count_columns(lines: list[LineBox]) -> tuple[int, int]:
    """(typical column count, table-like rows) of a page's text lines.

    Lines are grouped into horizontal bands one median line high; side-by-side lines in a band
    more than a line height apart are separate columns (or cells).
    """
    if not lines:
        return 0, 0
    line_height = statistics.median(line.y1 - line.y0 for line in lines) or 1.0
    bands: dict[int, list[LineBox]] = {}
    for line in lines:
        bands.setdefault(int((line.y0 + line.y1) / 2 // line_height), []).append(line)
    counts = []
    table_rows = 0
    for band in bands.values():
        band.sort(key=lambda line: line.x0)
        pieces = [[band[0].x1, band[0].chars]]  # [right edge, characters]
        for line in band[1:]:
            if line.x0 - pieces[-1][0] < line_height:
                pieces[-1] = [max(pieces[-1][0], line.x1), pieces[-1][1] + line.chars]
            else:
                pieces.append([line.x1, line.chars])
        counts.append(len(pieces))
        if len(pieces) >= 3 and statistics.median(p[1] for p in pieces) <= MAX_CELL_CHARS:
            table_rows += 1
    counts.sort(reverse=True)
    return counts[max(0, int(len(counts) * MIN_COLUMN_SHARE) - 1)], table_rows
