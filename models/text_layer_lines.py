"""Lines of a page's text layer, cleaned into the characters and words a person would type.

PyMuPDF reports what the PDF draws: ligature glyphs (`ﬁ`), Arabic presentation forms (the
shaped initial/medial/final glyphs), no-break spaces, and words broken at line ends with a
hyphen. Here those become plain text: ligatures and presentation forms are decomposed, and
lines are joined with hyphenation undone. Normalisation is targeted rather than NFKC on
everything, because NFKC would also turn `²` into `2`, `½` into `1⁄2` and CJK full-width
punctuation into ASCII, changing what the page says.

Lines on one baseline are kept together as a row: MuPDF splits a line at a change of writing
direction (`habibi` then an Arabic word) and at wide gaps (an item and its price), and the row
keeps both the words' logical order and an item on the same row as its price.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import pymupdf

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in page points

# PRESERVE_LIGATURES: ligatures are expanded here, the same way for every font; MuPDF's own
# TEXT_DEHYPHENATE is left off because it also drops the hyphen of `Self-` + `Evident`.
TEXT_FLAGS = pymupdf.TEXTFLAGS_TEXT
CELL_GAP_EMS = 1.5  # fragments of a row further apart than this are separate cells (a price)
WORD_GAP_EMS = 0.1  # ... and closer than this, parts of one word (no space between them)
HORIZONTAL_SINE = 0.1  # lines more steeply slanted than this (vertical CJK) are rows of their own
BOLD_SHARE = 0.8  # a row is bold when this share of its characters is set in a bold face
HYPHENS = "-\u2010\u00ad"  # hyphen-minus, hyphen, soft hyphen
_BOLD_FONT = re.compile(r"bold|black|heavy|semibold|demi", re.IGNORECASE)
_SPACES = re.compile(r"\s+")
_HYPHENATED_WORD = re.compile(r"\b(\w+)-(\w+)\b")
_LEADER_DOTS = re.compile(r"(?:\.\s?){4,}\s*\S{1,8}$")  # `Introduction . . . . 1`


def _compatibility_table() -> dict[int, str | None]:
    """Ligatures, Arabic and Hebrew presentation forms and odd spaces mapped to plain text.

    Presentation forms are glyph shapes, not letters: NFKC maps them back to the letters a
    reader would type, and nothing else in these blocks changes meaning."""
    table: dict[int, str | None] = {}
    presentation_forms = [*range(0xFB00, 0xFE00), *range(0xFE70, 0xFEFF)]
    for code in presentation_forms:
        normal = unicodedata.normalize("NFKC", chr(code))
        if normal != chr(code):
            table[code] = normal
    for code in [0x00A0, *range(0x2000, 0x200B), 0x202F, 0x205F]:
        table[code] = " "
    table[0xFEFF] = None  # byte order mark: invisible, not text
    table[0x200B] = None  # zero-width space
    return table


_COMPATIBILITY = _compatibility_table()


def normalise_text(text: str) -> str:
    """`text` with ligatures, presentation forms and special spaces made plain; scripts,
    superscripts, currency signs and CJK punctuation are kept as they are."""
    # TeX draws © as a c inside an enclosing circle
    return text.translate(_COMPATIBILITY).replace("c\u20dd", "\u00a9")


def is_contents_entry(text: str) -> bool:
    """Whether `text` is a table-of-contents line: a title, leader dots and a page number."""
    return bool(_LEADER_DOTS.search(text))


@dataclass
class TextRow:
    """One visual line of text: the fragments MuPDF reports on one baseline, in its order."""

    bbox: Box
    text: str
    size: float  # character-weighted font size
    bold: bool
    cells: list[tuple[Box, str]]  # fragments separated by wide gaps: table cells, prices

    @property
    def chars(self) -> int:
        return len(self.text)


@dataclass
class _Fragment:
    bbox: Box
    text: str
    size_chars: float  # sum of size x characters
    bold_chars: int
    chars: int
    horizontal: bool  # written left to right or right to left, not vertically or rotated


def page_rows(page: pymupdf.Page) -> list[list[TextRow]]:
    """The page's text blocks as rows of cleaned text, in MuPDF's block order."""
    blocks: list[list[TextRow]] = []
    for raw in page.get_text("dict", flags=TEXT_FLAGS)["blocks"]:
        fragments = [fragment for line in raw.get("lines", []) if (fragment := _fragment(line))]
        rows = _rows(fragments)
        if rows:
            blocks.append(rows)
    return blocks


def _fragment(line: dict) -> _Fragment | None:
    size_chars = 0.0
    bold_chars = chars = 0
    for span in line["spans"]:
        count = len(span["text"].strip())
        size_chars += span["size"] * count
        chars += count
        if span["flags"] & pymupdf.TEXT_FONT_BOLD or _is_bold_font(span["font"]):
            bold_chars += count
    text = normalise_text("".join(span["text"] for span in line["spans"]))
    if not chars or not text.strip():
        return None
    horizontal = abs(line["dir"][1]) < HORIZONTAL_SINE
    return _Fragment(tuple(line["bbox"]), text, size_chars, bold_chars, chars, horizontal)


@functools.cache
def _is_bold_font(name: str) -> bool:
    """Whether a font's name says bold; some bold fonts lack MuPDF's bold flag."""
    return bool(_BOLD_FONT.search(name))


def _rows(fragments: list[_Fragment]) -> list[TextRow]:
    """Fragments grouped into rows: consecutive fragments whose vertical middles fall within
    each other's height share a baseline."""
    groups: list[list[_Fragment]] = []
    for fragment in fragments:
        previous = groups[-1][-1] if groups else None
        if (
            previous
            and previous.horizontal
            and fragment.horizontal
            and _same_row(previous, fragment)
        ):
            groups[-1].append(fragment)
        else:
            groups.append([fragment])
    return [_row(group) for group in groups]


def _same_row(first: _Fragment, second: _Fragment) -> bool:
    a, b = first.bbox, second.bbox
    middle_a, middle_b = (a[1] + a[3]) / 2, (b[1] + b[3]) / 2
    return b[1] <= middle_a <= b[3] and a[1] <= middle_b <= a[3]


def _row(fragments: list[_Fragment]) -> TextRow:
    chars = sum(f.chars for f in fragments)
    size = sum(f.size_chars for f in fragments) / chars
    cells: list[tuple[Box, str]] = []
    text = ""
    previous: _Fragment | None = None
    # Cells are split by position, but the text keeps MuPDF's order, which is the logical
    # order of mixed left-to-right and right-to-left runs.
    for fragment in fragments:
        piece = fragment.text
        if previous is None:
            text = piece.strip()
            cells.append((fragment.bbox, piece.strip()))
        else:
            gap = _gap(previous.bbox, fragment.bbox)
            if gap > size * CELL_GAP_EMS:
                cells.append((fragment.bbox, piece.strip()))
            else:
                box, cell = cells[-1]
                cells[-1] = (_union(box, fragment.bbox), _join_fragment(cell, piece, gap, size))
            text = _join_fragment(text, piece, gap, size)
        previous = fragment
    bbox = _union(*(f.bbox for f in fragments))
    cells = [(box, _SPACES.sub(" ", cell).strip()) for box, cell in cells]
    return TextRow(bbox, _SPACES.sub(" ", text).strip(), size, _is_bold(fragments, chars), cells)


def _gap(a: Box, b: Box) -> float:
    """Horizontal distance between two boxes on one row, in either direction."""
    return max(b[0] - a[2], a[0] - b[2], 0.0)


def _join_fragment(text: str, piece: str, gap: float, size: float) -> str:
    if text[-1:].isspace() or piece[:1].isspace() or gap < size * WORD_GAP_EMS:
        return text + piece
    return f"{text} {piece.strip()}"


def _is_bold(fragments: list[_Fragment], chars: int) -> bool:
    return sum(f.bold_chars for f in fragments) >= BOLD_SHARE * chars


def _union(*boxes: Box) -> Box:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def bbox_of(rows: Iterable[TextRow]) -> Box:
    return _union(*(row.bbox for row in rows))


# --- joining lines into paragraphs ----------------------------------------------------------------


def hyphenated_words(texts: Iterable[str]) -> frozenset[str]:
    """Words written with a hyphen inside a line (`well-known`), lower-cased: a line break
    after `well-` then keeps the hyphen."""
    return frozenset(
        match.group(0).lower() for text in texts for match in _HYPHENATED_WORD.finditer(text)
    )


def join_lines(lines: list[str], compounds: frozenset[str] = frozenset()) -> str:
    """Lines of one paragraph as one string, with hyphenation at line ends undone.

    `adip-` + `iscing` becomes `adipiscing`; the hyphen stays where the next line starts with
    a capital or digit (`Self-` + `Evident`, `COVID-` + `19`) or where the page writes the
    word with a hyphen elsewhere (`compounds`). A soft hyphen is always a break hyphen."""
    text = ""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if not text:
            text = line
        elif text[-1] in HYPHENS and len(text) > 1 and text[-2].isalpha():
            text = _join_hyphenated(text, line, compounds)
        elif text[-1] == "\u2014" or (_is_wide(text[-1]) and _is_wide(line[0])):
            text += line  # after an em dash, and between CJK characters, lines join directly
        else:
            text = f"{text} {line}"
    return text.replace("\u00ad", "")


def _is_wide(char: str) -> bool:
    return unicodedata.east_asian_width(char) in "WF"


def _join_hyphenated(text: str, line: str, compounds: frozenset[str]) -> str:
    hyphen, head = text[-1], text[:-1]
    if hyphen == "\u00ad" or (line[0].islower() and not _is_compound(head, line, compounds)):
        return head + line
    if line[0].isalnum():
        return text + line
    return f"{text} {line}"


def _is_compound(head: str, line: str, compounds: frozenset[str]) -> bool:
    before = re.search(r"(\w+)$", head)
    after = re.match(r"\w+", line)
    return bool(before and after) and f"{before[1]}-{after[0]}".lower() in compounds
