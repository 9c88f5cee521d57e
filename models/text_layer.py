"""A born-digital page's own text layer as an engine result (the `text-layer` route).

No model runs. PyMuPDF's text rows become the markdown a person would write:
- characters cleaned and words rejoined across line ends (`text_layer_lines`);
- running headers, footers and page numbers, recognised against neighbouring pages
  (`text_layer_context`), kept as `header`/`footer` blocks but left out of the markdown;
- headings only for short runs set larger (or larger and bold) than the document's body text,
  in a style no running text uses;
- ruled and column-aligned tables as markdown tables, HTML where cells span
  (`text_layer_tables`), their text not repeated as paragraphs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pymupdf

from models.engine import Block, FinishReason, OcrResult
from models.reading_order import reading_order, to_bins
from models.text_layer_context import (
    PageContext,
    is_running_text,
    page_blocks,
    page_context,
    style_runs,
)
from models.text_layer_lines import (
    Box,
    TextRow,
    bbox_of,
    hyphenated_words,
    is_contents_entry,
    join_lines,
)
from models.text_layer_tables import (
    TextTable,
    aligned_table,
    close_below,
    is_table_row,
    ruled_tables,
)

ENGINE_NAME = "pymupdf-text"
HEADING_SCALE = 1.2  # a short run this much larger than body text is a section heading
TITLE_SCALE = 1.6  # ... and this much larger, a title
BOLD_HEADING_SCALE = 1.1  # ... and a bold one this much larger, a subsection heading
HARD_BREAK_SHARE = 0.7
"""A row ending before this share of its paragraph's width, not hyphenated, ends a line on
purpose (an address, a name above a date) and keeps its line break."""

_ATX_HEADING = re.compile(r"^(#{1,6}(?:\s|$))")  # a line markdown would read as a heading

pymupdf.no_recommend_layout()  # find_tables would otherwise print an advert on stdout


@dataclass
class _Item:
    bbox: Box
    label: str  # title, text, table, header, footer
    text: str  # plain text
    markdown: str | None  # None: not part of the page's markdown (running lines)


def read_text_layer(page: pymupdf.Page, key: str) -> OcrResult:
    """The page's text layer as blocks (label `title`, `text`, `table`, `header` or `footer`)
    and markdown. Neighbouring pages of the same document are read (once) to recognise
    running headers and footers and the document's body text size."""
    blocks = page_blocks(page)
    context = page_context(page, blocks)
    tables = ruled_tables(page)
    compounds = hyphenated_words(row.text for rows in blocks for row in rows)

    items = [_Item(table.bbox, "table", table.text, table.markdown) for table in tables]
    bands = {
        id(row): context.running_band(row)
        for rows in blocks
        for row in rows
        if not _inside_any(row.bbox, tables)
    }
    if not tables and None not in bands.values():
        # Running lines run beside a page's content: on a page of nothing else (a form, a
        # title page, one line per page) the repeated lines are the content; page numbers stay
        # page numbers.
        bands = {
            id(row): band if band is not None and context.is_page_number(row, band) else None
            for rows in blocks
            for row in rows
            for band in [bands[id(row)]]
        }
    table_blocks: list[list[TextRow]] = []  # consecutive blocks of cell rows: a table?
    for rows in blocks:
        content: list[TextRow] = []
        for row in rows:
            if _inside_any(row.bbox, tables):
                continue
            band = bands[id(row)]
            if band is not None:
                items.append(_Item(row.bbox, band.value, row.text, None))
            else:
                content.append(row)
        if not content:
            continue
        if all(is_table_row(row) for row in content):
            if table_blocks and not close_below(table_blocks[-1][-1], content[0]):
                items += _table_or_text(table_blocks, context, compounds)
                table_blocks = []
            table_blocks.append(content)
            continue
        items += _table_or_text(table_blocks, context, compounds)
        table_blocks = []
        items += _text_items(content, context, compounds)
    items += _table_or_text(table_blocks, context, compounds)
    return _result(page, key, items, context)


def _result(page: pymupdf.Page, key: str, items: list[_Item], context: PageContext) -> OcrResult:
    width, height = page.rect.width, page.rect.height
    order = reading_order([item.bbox for item in items], line_height=context.body_size * 1.2)
    ordered = [items[i] for i in order]
    blocks = [
        Block(
            label=item.label,
            text=item.markdown if item.label == "table" else item.text,
            boxes_bins=[to_bins(item.bbox, width, height)],
            boxes_page=[[round(v, 2) for v in item.bbox]],
        )
        for item in ordered
    ]
    return OcrResult(
        key=key,
        markdown="\n\n".join(item.markdown for item in ordered if item.markdown is not None),
        blocks=blocks,
        raw_output="\n".join(item.text for item in ordered),
        finish_reason=FinishReason.EOS,
        engine=ENGINE_NAME,
        model_revision=f"pymupdf-{pymupdf.__version__}",
    )


def _text_items(
    rows: list[TextRow], context: PageContext, compounds: frozenset[str]
) -> list[_Item]:
    """A block's rows as headings and paragraphs: runs in a heading style become headings,
    the runs between them one paragraph."""
    items: list[_Item] = []
    paragraph: list[TextRow] = []
    for run in style_runs(rows):
        level = _heading_level(run, context)
        if level is None:
            paragraph += run
            continue
        if paragraph:
            items.append(_paragraph(paragraph, compounds))
            paragraph = []
        text = join_lines([row.text for row in run], compounds)
        items.append(_Item(bbox_of(run), "title", text, f"{'#' * level} {text}"))
    if paragraph:
        items.append(_paragraph(paragraph, compounds))
    return items


def _heading_level(run: list[TextRow], context: PageContext) -> int | None:
    """`#` for a title-sized run, `##` for a section-sized one, `###` for a bold one a little
    larger than body text, None for running text.

    Levels come from the ratio to the document's body text, not a ranking of the page's
    sizes, so a section heading gets the same level on a page without a title. A name or a
    date in body-size text is never a heading, bold or not."""
    if not context.body_size or is_running_text(run):
        return None
    if not any(char.isalpha() for row in run for char in row.text):
        return None
    if any(is_contents_entry(row.text) for row in run):
        return None
    if (round(run[0].size * 2) / 2, run[0].bold) in context.paragraph_styles:
        return None  # some paragraph nearby is set in this style: it is not a heading style
    ratio = run[0].size / context.body_size
    if ratio >= TITLE_SCALE:
        return 1
    if ratio >= HEADING_SCALE:
        return 2
    if ratio >= BOLD_HEADING_SCALE and all(row.bold for row in run):
        return 3
    return None


def _paragraph(rows: list[TextRow], compounds: frozenset[str]) -> _Item:
    """Rows joined into a paragraph; rows ending short of the paragraph's width on purpose,
    and table-of-contents entries, keep their line breaks."""
    box = bbox_of(rows)
    right = box[0] + (box[2] - box[0]) * HARD_BREAK_SHARE
    lines: list[list[str]] = [[]]
    for index, row in enumerate(rows):
        lines[-1].append(row.text)
        last = index == len(rows) - 1
        short = row.bbox[2] < right and row.text[-1:] not in "-\u2010\u00ad"
        if not last and (short or is_contents_entry(row.text)):
            lines.append([])
    joined = [join_lines(line, compounds) for line in lines]
    markdown = "\n".join(_ATX_HEADING.sub(r"\\\1", line) for line in joined)
    return _Item(box, "text", "\n".join(joined), markdown)


def _table_or_text(
    blocks: list[list[TextRow]], context: PageContext, compounds: frozenset[str]
) -> list[_Item]:
    """Consecutive blocks of cell rows as one aligned table, else as text."""
    if not blocks:
        return []
    table = aligned_table([row for rows in blocks for row in rows])
    if table is not None:
        return [_Item(table.bbox, "table", table.text, table.markdown)]
    return [item for rows in blocks for item in _text_items(rows, context, compounds)]


def _inside_any(bbox: Box, tables: list[TextTable]) -> bool:
    centre_x, centre_y = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    return any(
        table.bbox[0] <= centre_x <= table.bbox[2] and table.bbox[1] <= centre_y <= table.bbox[3]
        for table in tables
    )
