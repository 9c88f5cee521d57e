"""Tables in a page's text layer, written as markdown (HTML where a cell spans).

Ruled tables come from PyMuPDF's table finder. It costs tens to hundreds of milliseconds on a
full page, so it runs only on pages that draw both horizontal and vertical rules, and only
within the rules' bounding box. Unruled tables (a price list, a receipt) are rows whose text
sits in cells separated by wide gaps; runs of such rows are aligned into columns, so each price
stays on the row of its item.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import pymupdf

from models.text_layer_lines import (
    Box,
    TextRow,
    bbox_of,
    hyphenated_words,
    join_lines,
    normalise_text,
)

MIN_RULES = 2  # horizontal and vertical rules needed before looking for a ruled table
RULE_MIN_LENGTH = 5
EDGE_TOLERANCE = 1.0  # points: cell edges closer than this are one grid line
MAX_ROW_GAP_LINES = 2.0  # unruled rows further apart than this many row heights are two tables
SHORT_CELL_CHARS = 25  # an unruled table has a column of short cells (prices, quantities)


@dataclass
class TextTable:
    """A table found on the page: its box, its plain text (a row per line) and its markdown."""

    bbox: Box
    text: str
    markdown: str


# --- ruled tables ---------------------------------------------------------------------------


def ruled_tables(page: pymupdf.Page) -> list[TextTable]:
    """The page's ruled tables with at least two rows and two columns."""
    rules = _rules_box(page)
    if rules is None:
        return []
    x0, y0, x1, y1 = rules
    clip = pymupdf.Rect(
        x0 - EDGE_TOLERANCE, y0 - EDGE_TOLERANCE, x1 + EDGE_TOLERANCE, y1 + EDGE_TOLERANCE
    )
    found = page.find_tables(clip=clip, strategy="lines").tables
    return [_ruled_table(table) for table in found if table.row_count > 1 and table.col_count > 1]


def _rules_box(page: pymupdf.Page) -> Box | None:
    """The box around the page's rules when it draws enough of both kinds (about 1 ms)."""
    horizontal = vertical = 0
    boxes: list[Box] = []
    for drawing in page.get_drawings():
        for item in drawing["items"]:
            if item[0] == "l":
                start, end = item[1], item[2]
                rect = pymupdf.Rect(start, start) | end
            elif item[0] == "re":
                rect = item[1]
            else:
                continue
            is_horizontal = rect.height < 2 and rect.width > RULE_MIN_LENGTH
            is_vertical = rect.width < 2 and rect.height > RULE_MIN_LENGTH
            is_box = item[0] == "re" and min(rect.width, rect.height) > RULE_MIN_LENGTH
            horizontal += is_horizontal or is_box
            vertical += is_vertical or is_box
            if is_horizontal or is_vertical or is_box:
                boxes.append(tuple(rect))
    if horizontal < MIN_RULES or vertical < MIN_RULES:
        return None
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def _ruled_table(table: pymupdf.table.Table) -> TextTable:
    contents = table.extract()
    compounds = hyphenated_words(cell for row in contents for cell in row if cell)
    cells: list[list[_Cell | None]] = []
    for row, texts in zip(table.rows, contents, strict=True):
        cells.append(
            [
                None if box is None else _Cell(tuple(box), _cell_text(text, compounds))
                for box, text in zip(row.cells, texts, strict=True)
            ]
        )
    _measure_spans(cells)
    return TextTable(
        bbox=tuple(table.bbox),
        text="\n".join(" ".join(c.text for c in row if c and c.text) for row in cells),
        markdown=_html(cells) if _has_spans(cells) else _markdown(cells),
    )


@dataclass
class _Cell:
    bbox: Box
    text: str
    rowspan: int = 1
    colspan: int = 1


def _cell_text(text: str | None, compounds: frozenset[str]) -> str:
    return join_lines(normalise_text(text or "").split("\n"), compounds)


def _measure_spans(rows: list[list[_Cell | None]]) -> None:
    """Sets each cell's row and column span from the grid lines that run through it."""
    present = [cell for row in rows for cell in row if cell]
    xs = _grid_lines([edge for cell in present for edge in (cell.bbox[0], cell.bbox[2])])
    ys = _grid_lines([edge for cell in present for edge in (cell.bbox[1], cell.bbox[3])])
    for cell in present:
        x0, y0, x1, y1 = cell.bbox
        cell.colspan = 1 + sum(x0 + EDGE_TOLERANCE < x < x1 - EDGE_TOLERANCE for x in xs)
        cell.rowspan = 1 + sum(y0 + EDGE_TOLERANCE < y < y1 - EDGE_TOLERANCE for y in ys)


def _grid_lines(edges: list[float]) -> list[float]:
    lines: list[float] = []
    for edge in sorted(edges):
        if not lines or edge - lines[-1] > EDGE_TOLERANCE:
            lines.append(edge)
    return lines


def _has_spans(rows: list[list[_Cell | None]]) -> bool:
    return any(cell and (cell.rowspan > 1 or cell.colspan > 1) for row in rows for cell in row)


def _markdown(rows: Sequence[Sequence[_Cell | None]]) -> str:
    """A pipe table; the first row is its header, as in most tables a person writes."""
    lines = ["|" + "|".join(_pipe_cell(cell) for cell in row) + "|" for row in rows]
    lines.insert(1, "|" + "|".join("---" for _ in rows[0]) + "|")
    return "\n".join(lines)


def _pipe_cell(cell: _Cell | None) -> str:
    return "" if cell is None else cell.text.replace("|", "\\|")


def _html(rows: list[list[_Cell | None]]) -> str:
    """An HTML table, the only markdown form for cells spanning rows or columns."""
    parts = ["<table>"]
    for row in rows:
        parts.append("<tr>")
        for cell in row:
            if cell is None:  # covered by a spanning cell
                continue
            spans = "".join(
                f' {name}="{count}"'
                for name, count in (("rowspan", cell.rowspan), ("colspan", cell.colspan))
                if count > 1
            )
            parts.append(f"<td{spans}>{html.escape(cell.text, quote=False)}</td>")
        parts.append("</tr>")
    parts.append("</table>")
    return "".join(parts)


# --- unruled tables -------------------------------------------------------------------------


def is_table_row(row: TextRow) -> bool:
    """Whether the row's text sits in separate cells (an item and its price)."""
    return len(row.cells) > 1


def aligned_table(rows: list[TextRow]) -> TextTable | None:
    """Rows of cells as a table when their cells line up in columns, one of them of short
    cells; None when they do not (two columns of prose that happen to share baselines)."""
    if len(rows) < 2 or not all(is_table_row(row) for row in rows):
        return None
    columns = _columns([box for row in rows for box, _ in row.cells])
    if len(columns) < 2:
        return None
    grid: list[list[_Cell | None]] = []
    for row in rows:
        cells: list[_Cell | None] = [None] * len(columns)
        for box, text in row.cells:
            index = next(i for i, (x0, x1) in enumerate(columns) if x0 <= box[0] <= x1)
            if cells[index] is not None:
                return None  # two cells of one row in one column: not aligned
            cells[index] = _Cell(box, text)
        grid.append(cells)
    short_column = any(
        all(cell is None or len(cell.text) <= SHORT_CELL_CHARS for cell in column)
        for column in zip(*grid, strict=True)
    )
    if not short_column:
        return None
    text = "\n".join(" ".join(c.text for c in row if c) for row in grid)
    return TextTable(bbox=bbox_of(rows), text=text, markdown=_markdown(grid))


def close_below(upper: TextRow, lower: TextRow) -> bool:
    """Whether `lower` continues a table whose last row is `upper`."""
    height = upper.bbox[3] - upper.bbox[1]
    return 0 <= lower.bbox[1] - upper.bbox[1] <= height * (1 + MAX_ROW_GAP_LINES)


def _columns(boxes: list[Box]) -> list[tuple[float, float]]:
    """Column extents: the cells' horizontal extents, overlapping ones merged, so left-aligned
    items and right-aligned prices of different widths each form one column."""
    columns: list[tuple[float, float]] = []
    for x0, _, x1, _ in sorted(boxes):
        if columns and x0 <= columns[-1][1]:
            columns[-1] = (columns[-1][0], max(columns[-1][1], x1))
        else:
            columns.append((x0, x1))
    return columns
