"""What a page's neighbours say about it: running headers and footers, and the body text style.

A running header or page number is only recognisable as such across pages: the same line (its
digits aside) in the same band at the top or bottom of neighbouring pages. Headings likewise
are judged against the document's running text, not one page's, so a cover or letter page
with little text does not promote its body-size lines to headings.

The pipeline reads one page at a time, so neighbours are read here, from the page's own
document, and each page's summary is cached on the document object for the pages after it.
A neighbour read ahead keeps its rows until its own turn, so no page is extracted twice.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

import pymupdf

from models.text_layer_lines import TextRow, page_rows

BAND_SHARE = 0.1  # top and bottom tenth of the page: where running lines are printed
NEIGHBOURS = 2  # pages either side compared (two, so alternating left/right headers match)
MAX_HEADING_ROWS = 3  # a run of more rows, or more characters, is running text
MAX_HEADING_CHARS = 160
SENTENCE_ENDS = ".!?。"  # ... and so is a sentence of a few words
MIN_WORDS = 4
SMALL_PRINT_SHARE = 0.5
"""Body text is the largest font size carrying at least this share of the characters of the
most used size: on a short letter, a long disclaimer in small print is not the body text."""
RUNNING_MAX_SCALE = 1.2  # a repeated row this much larger than body text is a heading
PAGE_NUMBER_SCALE = 1.05  # a lone number at the top no larger than body text is a page number
MAX_READ_AHEAD = 4  # neighbours' rows kept for their own turn
_CACHE_ATTRIBUTE = "_ocrflow_text_layer_pages"

_ROMAN_NUMERAL = r"(?=[ivxlcdm])m{0,3}(?:cm|cd|d?c{0,3})(?:xc|xl|l?x{0,3})(?:ix|iv|v?i{0,3})"
_PAGE_NUMBER = re.compile(
    r"^[\W_]*(?:(?:page|p\.|pg\.?|pag\.?|seite|s\.|página|pagina|страница|стр\.)\s*)?"
    rf"(?:\d{{1,4}}|{_ROMAN_NUMERAL})(?:\s*(?:/|of|von|de|di|из)\s*\d{{1,4}})?[\W_]*$",
    re.IGNORECASE,
)
_DIGITS = re.compile(r"\d+")
_ROMAN_WORD = re.compile(r"\b[ivxlcdm]+\b")
_ROMAN = re.compile(_ROMAN_NUMERAL)
_SPACES = re.compile(r"\s+")

Style = tuple[float, bool]  # font size in half points, bold


class Band(Enum):
    TOP = "header"
    BOTTOM = "footer"


@dataclass(frozen=True)
class PageSummary:
    """A page's running-line candidates and type sizes, enough to judge its neighbours."""

    bands: dict[Band, frozenset[str]]  # normalised rows printed in each band
    sizes: Counter[float]  # characters by font size outside the bands
    paragraph_styles: frozenset[Style]  # styles some run of running text is set in


@dataclass(frozen=True)
class PageContext:
    """What the page's neighbours establish for it."""

    body_size: float
    paragraph_styles: frozenset[Style]
    repeated: dict[Band, frozenset[str]]
    page_height: float

    def running_band(self, row: TextRow) -> Band | None:
        """The band `row` is a running header or footer of, or None for page content.

        A row counts when it repeats (digits aside) in the same band of a neighbour, unless
        set in heading size (the same title on two slides in a row is content), or when it is
        a lone page number (`3`, `- 4 -`, `Page 1 of 9`)."""
        band = band_of(row, self.page_height)
        if band is None:
            return None
        heading_size = self.body_size and row.size >= self.body_size * RUNNING_MAX_SCALE
        if row_key(row.text) in self.repeated[band] and not heading_size:
            return band
        return band if self.is_page_number(row, band) else None

    def is_page_number(self, row: TextRow, band: Band) -> bool:
        """A lone page number in `band`; at the top only in body-size type (a large `1`
        there opens chapter one)."""
        small = band is Band.BOTTOM or row.size <= self.body_size * PAGE_NUMBER_SCALE
        return small and len(row.cells) == 1 and bool(_PAGE_NUMBER.match(row.text))


@dataclass
class _DocumentCache:
    summaries: dict[int, PageSummary] = field(default_factory=dict)
    # page number -> (its rotation when read, its blocks): a page turned since is read again
    read_ahead: dict[int, tuple[int, list[list[TextRow]]]] = field(default_factory=dict)


def style_of(row: TextRow) -> Style:
    return round(row.size * 2) / 2, row.bold


def row_key(text: str) -> str:
    """`text` as compared across pages: case, spacing and page numbers do not matter."""
    key = _DIGITS.sub("#", text.casefold())
    key = _ROMAN_WORD.sub(lambda word: "#" if _ROMAN.fullmatch(word[0]) else word[0], key)
    return _SPACES.sub(" ", key).strip()


def band_of(row: TextRow, page_height: float) -> Band | None:
    band = page_height * BAND_SHARE
    if row.bbox[3] <= band:
        return Band.TOP
    if row.bbox[1] >= page_height - band:
        return Band.BOTTOM
    return None


def page_blocks(page: pymupdf.Page) -> list[list[TextRow]]:
    """The page's blocks of rows, taken from the read-ahead cache when a neighbour read them."""
    cache = _cache(page)
    if cache is not None and page.number in cache.read_ahead:
        rotation, blocks = cache.read_ahead.pop(page.number)
        if rotation == page.rotation:
            return blocks
    return page_rows(page)


def page_context(page: pymupdf.Page, blocks: list[list[TextRow]]) -> PageContext:
    """The page's context from its own rows and its neighbours' summaries (read once each)."""
    height = page.rect.height
    cache = _cache(page)
    own = cache.summaries.get(page.number) if cache is not None else None
    if own is None:
        own = summarise(blocks, height)
    summaries = [own]
    repeated: dict[Band, set[str]] = {Band.TOP: set(), Band.BOTTOM: set()}
    if cache is not None:
        cache.summaries[page.number] = own
        for number in _neighbour_numbers(page):
            neighbour = _summary(page.parent, number, cache)
            if neighbour is None:
                continue
            summaries.append(neighbour)
            for band in Band:
                repeated[band] |= own.bands[band] & neighbour.bands[band]
    sizes: Counter[float] = Counter()
    for summary in summaries:
        sizes.update(summary.sizes)
    return PageContext(
        body_size=body_size(sizes),
        paragraph_styles=frozenset().union(*(s.paragraph_styles for s in summaries)),
        repeated={band: frozenset(keys) for band, keys in repeated.items()},
        page_height=height,
    )


def summarise(blocks: list[list[TextRow]], page_height: float) -> PageSummary:
    bands: dict[Band, set[str]] = {Band.TOP: set(), Band.BOTTOM: set()}
    sizes: Counter[float] = Counter()
    paragraph_styles: set[Style] = set()
    for rows in blocks:
        content = []
        for row in rows:
            band = band_of(row, page_height)
            if band is None:
                content.append(row)
                sizes[style_of(row)[0]] += row.chars
            else:
                bands[band].add(row_key(row.text))
        paragraph_styles.update(_paragraph_styles(content))
    return PageSummary(
        bands={band: frozenset(keys) for band, keys in bands.items()},
        sizes=sizes,
        paragraph_styles=frozenset(paragraph_styles),
    )


def body_size(sizes: Counter[float]) -> float:
    """The running text's font size (see SMALL_PRINT_SHARE); 0 when there is no text."""
    if not sizes:
        return 0.0
    most = max(sizes.values())
    return max(size for size, chars in sizes.items() if chars >= most * SMALL_PRINT_SHARE)


def is_running_text(rows: list[TextRow]) -> bool:
    """Whether a run of rows in one style is running text: too long for a heading, or a
    sentence (several words ending in a full stop), which headings almost never are."""
    if len(rows) > MAX_HEADING_ROWS or sum(row.chars for row in rows) > MAX_HEADING_CHARS:
        return True
    last = rows[-1].text
    return last[-1:] in SENTENCE_ENDS and sum(len(row.text.split()) for row in rows) >= MIN_WORDS


def style_runs(rows: list[TextRow]) -> list[list[TextRow]]:
    """Consecutive rows grouped by style: a bold heading set just above its paragraph, in one
    MuPDF block, is split from it here."""
    runs: list[list[TextRow]] = []
    for row in rows:
        if runs and style_of(runs[-1][-1]) == style_of(row):
            runs[-1].append(row)
        else:
            runs.append([row])
    return runs


def _paragraph_styles(rows: list[TextRow]) -> set[Style]:
    return {style_of(run[0]) for run in style_runs(rows) if is_running_text(run)}


def _neighbour_numbers(page: pymupdf.Page) -> list[int]:
    count = page.parent.page_count
    window = range(page.number - NEIGHBOURS, page.number + NEIGHBOURS + 1)
    return [number for number in window if 0 <= number < count and number != page.number]


def _summary(document: pymupdf.Document, number: int, cache: _DocumentCache) -> PageSummary | None:
    """A neighbour's summary, read once; None for a page MuPDF cannot read, which must not
    fail the page being read."""
    if number not in cache.summaries:
        try:
            neighbour = document.load_page(number)
            blocks = page_rows(neighbour)
        except (RuntimeError, ValueError):
            return None
        cache.summaries[number] = summarise(blocks, neighbour.rect.height)
        if len(cache.read_ahead) >= MAX_READ_AHEAD:
            cache.read_ahead.pop(next(iter(cache.read_ahead)))
        cache.read_ahead[number] = (neighbour.rotation, blocks)
    return cache.summaries[number]


def _cache(page: pymupdf.Page) -> _DocumentCache | None:
    """The per-document cache, kept on the document so it lives and dies with it."""
    document = page.parent
    if document is None or page.number is None:
        return None
    cache = getattr(document, _CACHE_ATTRIBUTE, None)
    if cache is None:
        cache = _DocumentCache()
        setattr(document, _CACHE_ATTRIBUTE, cache)
    return cache
