"""Parse DeepSeek-OCR's grounded output into layout blocks, clean markdown and figure crops.

The model writes `<|ref|>LABEL<|/ref|><|det|>[[x1,y1,x2,y2], ...]<|/det|>` before each block,
then the block's content: plain markdown for text, HTML for tables, LaTeX for formulas. Boxes are
in 0..999 bins of the page. The official scripts `eval` the box list and assume well-formed tags;
here the output is scanned without eval and never raises: a page that looped until the token
limit ends mid-tag, and whatever cannot be read as a tag is kept as text or dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from models.deepseek_ocr.tokenizer import EOS_TOKEN
from models.engine import Block

if TYPE_CHECKING:
    from PIL import Image

REF_OPEN = "<|ref|>"
REF_CLOSE = "<|/ref|>"
DET_OPEN = "<|det|>"
DET_CLOSE = "<|/det|>"
FIGURE_LABEL = "image"
UNTAGGED_LABEL = "text"
MAX_BIN = 999

_TAG = re.compile(r"<\|/?(?:ref|det)\|>")
_DET_AFTER_REF = re.compile(r"[ \t]*<\|det\|>")
# The longest prefix of a <|det|> body that can belong to a box list.
_BOX_LIST_CHARS = re.compile(r"[\s\[\]\d,\-]*")
_INNER_LIST = re.compile(r"\[([^\[\]]*)\]")
_INTEGER = re.compile(r"\s*-?\d{1,6}\s*")
_EXTRA_NEWLINES = re.compile(r"\n{3,}")
# Official post-processing: two LaTeX macros the markdown renderers lack.
_LATEX_REPLACEMENTS = (("\\coloneqq", ":="), ("\\eqqcolon", "=:"))


@dataclass
class _DraftBlock:
    label: str
    boxes_bins: list[list[int]] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    tagged: bool = True

    @property
    def raw_text(self) -> str:
        return "".join(self.text_parts)


@dataclass(frozen=True)
class ParsedPage:
    """Blocks in reading order and the page's clean markdown.

    Figure blocks (label `image`) with a box appear in the markdown as
    `![](images/{page_label}_{k}.jpg)`, k counting those figures from 0; `crop_figures` returns
    their crops in the same order.
    """

    blocks: list[Block]
    markdown: str


def clean_latex(text: str) -> str:
    """Apply the official replacements of `\\coloneqq` and `\\eqqcolon`."""
    for macro, replacement in _LATEX_REPLACEMENTS:
        text = text.replace(macro, replacement)
    return text


def parse_boxes(body: str) -> list[list[int]]:
    """The `[x1, y1, x2, y2]` boxes in a `<|det|>` body, in 0..999 bins.

    Lists that are not exactly four integers are skipped; values are clamped to the bin range
    and each box is ordered so that x1 <= x2 and y1 <= y2.
    """
    boxes = []
    for inner in _INNER_LIST.finditer(body):
        values = inner.group(1).split(",")
        if len(values) != 4 or not all(_INTEGER.fullmatch(value) for value in values):
            continue
        x1, y1, x2, y2 = (min(max(int(value), 0), MAX_BIN) for value in values)
        boxes.append([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)])
    return boxes


def bins_to_page(box: list[int], width: float, height: float) -> list[float]:
    """A 0..999 box in page coordinates, truncated like the official `int(c / 999 * W)`."""
    x1, y1, x2, y2 = box
    return [
        float(int(x1 / MAX_BIN * width)),
        float(int(y1 / MAX_BIN * height)),
        float(int(x2 / MAX_BIN * width)),
        float(int(y2 / MAX_BIN * height)),
    ]


def _read_det(raw: str, start: int) -> tuple[list[list[int]], str, int]:
    """Boxes of the `<|det|>` body starting at `start`, text that follows an unclosed body, and
    the position after it."""
    next_tag = _TAG.search(raw, start)
    end = next_tag.start() if next_tag else len(raw)
    body = raw[start:end]
    if next_tag and next_tag.group() == DET_CLOSE:
        return parse_boxes(body), "", next_tag.end()
    # Unclosed (truncated or malformed): the box list is the box-like prefix, up to its closing
    # "]]" when it has one; whatever follows is the block's text.
    box_like = _BOX_LIST_CHARS.match(body)
    prefix = body[: box_like.end()] if box_like else ""
    closing = prefix.rfind("]]")
    box_end = closing + 2 if closing != -1 else len(prefix)
    return parse_boxes(body[:box_end]), body[box_end:], end


def _scan(raw: str) -> list[_DraftBlock]:
    """Split the output into blocks at each `<|ref|>` tag, tolerating broken tags."""
    drafts = [_DraftBlock(label=UNTAGGED_LABEL, tagged=False)]
    position = 0
    while position < len(raw):
        tag = _TAG.search(raw, position)
        if tag is None:
            drafts[-1].text_parts.append(raw[position:])
            break
        drafts[-1].text_parts.append(raw[position : tag.start()])
        position = tag.end()
        if tag.group() == DET_OPEN:
            # A box list without a label: its boxes have no block to belong to.
            _, text, position = _read_det(raw, position)
            drafts[-1].text_parts.append(text)
        elif tag.group() == REF_OPEN:
            label_end = _TAG.search(raw, position)
            if label_end is None:
                break  # output cut inside the label
            if label_end.group() != REF_CLOSE:
                continue  # malformed: drop the opening tag, keep what follows as text
            draft = _DraftBlock(label=raw[position : label_end.start()].strip())
            position = label_end.end()
            det = _DET_AFTER_REF.match(raw, position)
            if det:
                draft.boxes_bins, text, position = _read_det(raw, det.end())
                draft.text_parts.append(text)
            drafts.append(draft)
        # Stray closing tags are dropped.
    return drafts


def _figure_reference(page_label: str | None, index: int) -> str:
    name = f"{page_label}_{index}" if page_label is not None else str(index)
    return f"![](images/{name}.jpg)\n"


def _markdown(drafts: list[_DraftBlock], page_label: str | None) -> str:
    pieces = []
    figure_index = 0
    for draft in drafts:
        if draft.label == FIGURE_LABEL and draft.boxes_bins:
            pieces.append(_figure_reference(page_label, figure_index))
            figure_index += 1
        pieces.append(draft.raw_text)
    markdown = clean_latex("".join(pieces))
    return _EXTRA_NEWLINES.sub("\n\n", markdown).strip()


def strip_end_of_sentence(raw: str) -> str:
    """The output up to the end-of-sentence token, which the decoder may leave in the text."""
    return raw.split(EOS_TOKEN, 1)[0]


def parse_grounded_output(
    raw: str, *, page_width: float, page_height: float, page_label: str | None = None
) -> ParsedPage:
    """Blocks and markdown of one page's output; never raises on malformed output.

    `page_width`/`page_height` give the page coordinate space of `Block.boxes_page`.
    `page_label` names figure references (`images/{page_label}_{k}.jpg`, or `images/{k}.jpg`
    when None). Output without tags becomes one `text` block.
    """
    drafts = _scan(strip_end_of_sentence(raw))
    blocks = []
    for draft in drafts:
        text = clean_latex(draft.raw_text).strip()
        if not draft.tagged and not text:
            continue
        blocks.append(
            Block(
                label=draft.label,
                text=text,
                boxes_bins=draft.boxes_bins,
                boxes_page=[bins_to_page(box, page_width, page_height) for box in draft.boxes_bins],
            )
        )
    return ParsedPage(blocks=blocks, markdown=_markdown(drafts, page_label))


def figure_blocks(blocks: list[Block]) -> list[Block]:
    """Figure blocks that have a region, in the order of their markdown references."""
    return [block for block in blocks if block.label == FIGURE_LABEL and block.boxes_bins]


def crop_figures(blocks: list[Block], page_image: Image.Image) -> list[tuple[Block, Image.Image]]:
    """Crop every figure block's region from the rendered page.

    A figure with several boxes is cropped to the rectangle enclosing them all. Pixel
    coordinates use the image's own size, like the official crops.
    """
    crops = []
    width, height = page_image.size
    for block in figure_blocks(blocks):
        x1 = min(box[0] for box in block.boxes_bins)
        y1 = min(box[1] for box in block.boxes_bins)
        x2 = max(box[2] for box in block.boxes_bins)
        y2 = max(box[3] for box in block.boxes_bins)
        left, top, right, bottom = bins_to_page([x1, y1, x2, y2], width, height)
        # A degenerate box still yields a 1-pixel crop, so references and crops stay aligned.
        right, bottom = max(right, left + 1), max(bottom, top + 1)
        crops.append((block, page_image.crop((int(left), int(top), int(right), int(bottom)))))
    return crops
