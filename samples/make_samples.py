"""Regenerates the bundled sample documents: `python samples/make_samples.py`.

Each sample exercises one kind of page the router must tell apart: born-digital prose with a
ruled table, an image-only scan, a sparse slide, a dense two-column page, a photographed-style
receipt and a two-page fax. Output is deterministic (fixed seeds, fixed metadata), and the text
drawn on every page is written to `ground_truth.json` so tests can score OCR against it.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pymupdf
from PIL import Image, ImageFilter

SAMPLES_DIR = Path(__file__).resolve().parent
LETTER = pymupdf.paper_rect("letter")  # 612 x 792 pt
SLIDE = pymupdf.Rect(0, 0, 960, 540)  # 16:9
LINE_SPACING = 1.3  # baseline to baseline, as a multiple of the font size
FIXED_METADATA = {
    "producer": "ocrflow samples",
    "creator": "samples/make_samples.py",
    "creationDate": "D:20260101000000Z",
    "modDate": "D:20260101000000Z",
}

# --- text --------------------------------------------------------------------------------------

REPORT_TITLE = "Valley Records Office: Annual Digitisation Report"
REPORT_SECTIONS = [
    (
        "Summary",
        [
            "This year the Valley Records Office finished the first full pass over its parish "
            "registers, council minutes and land surveys. More than forty thousand pages were "
            "scanned, checked and made searchable, which is twice the number we managed in the "
            "previous year with the same staff.",
            "The gain came from changing the order of work rather than from buying new "
            "equipment. Volumes are now prepared in batches of similar size, so the scanning "
            "bench is never idle while a conservator repairs a single fragile binding.",
        ],
    ),
    (
        "Collections",
        [
            "Parish registers remain the most requested records. Their handwriting varies from "
            "careful copperplate to hurried notes in the margin, and many pages carry later "
            "corrections in a different ink. We scan every register in colour so that these "
            "layers stay visible to readers.",
            "Council minutes from the last century were typed, which makes them well suited to "
            "automatic text recognition. Land surveys are large folded sheets; they are "
            "photographed in sections and joined afterwards.",
        ],
    ),
]
REPORT_TABLE_INTRO = (
    "The table below lists the pages completed for each collection, together with the share "
    "of pages whose text could be searched without manual correction."
)
REPORT_TABLE = [
    ["Collection", "Volumes", "Pages", "Searchable"],
    ["Parish registers", "212", "18,400", "71%"],
    ["Council minutes", "96", "14,250", "98%"],
    ["Land surveys", "41", "3,120", "64%"],
    ["School log books", "58", "5,030", "89%"],
    ["Total", "407", "40,800", "83%"],
]
REPORT_TABLE_OUTRO = (
    "Searchable pages are counted only when a sample of their text was checked by a member of "
    "staff. Registers score lowest because faded ink and dense corrections confuse the "
    "recognition software, while typed minutes are almost always read correctly."
)
REPORT_LAST_SECTIONS = [
    (
        "Next year",
        [
            "Our main goal for the coming year is to open the school log books to the public. "
            "They record daily life in twenty village schools, from weather and harvest "
            "holidays to outbreaks of illness, and they are already used by family historians "
            "who visit the reading room.",
            "We also plan to publish the land surveys as a single map that readers can zoom "
            "into. This needs careful work on the joins between sections, and we expect it to "
            "take most of the year.",
        ],
    ),
    (
        "Thanks",
        [
            "We are grateful to the volunteers who gave more than three thousand hours to "
            "preparing volumes, and to the county library for lending us a second scanning "
            "bench during the busiest months.",
        ],
    ),
]

SCAN_LINES = [
    "MINUTES OF THE WATER COMMITTEE",
    "Held at the Town Hall on Tuesday, 14 March 1961",
    "",
    "Present: the Chairman, Mr. Hollis, Mrs. Grant and Mr. Patel.",
    "",
    "1. The minutes of the previous meeting were read and signed.",
    "2. The Engineer reported that the new pump at Mill Lane had",
    "   been running for six weeks without fault. The old pump will",
    "   be kept in reserve until the end of the summer.",
    "3. A letter from the residents of Orchard Row asked for the",
    "   water main in their street to be renewed. The Committee",
    "   agreed to obtain an estimate before the next meeting.",
    "4. The cost of repairs to the reservoir fence was approved.",
    "",
    "There being no further business the meeting closed at 8.40 pm.",
]

SLIDE_TITLE = "Digitising the Parish Registers"
SLIDE_BULLETS = [
    "Scan every volume in colour at 400 dpi",
    "Check a sample of pages for readable text",
    "Publish the index before the end of the year",
]

TWO_COLUMN_TITLE = "The Harbour Lights of the Northern Coast"
TWO_COLUMN_PARAGRAPHS = [
    "For more than two centuries the lighthouses of the northern coast guided fishing boats "
    "and cargo ships through some of the most dangerous water in the country. The earliest "
    "lights were simple coal fires burning in iron baskets, raised on poles or built into the "
    "walls of harbour towers. They were hard to keep alight in wind and rain, and sailors "
    "often complained that they could not tell one fire from another.",
    "The first stone tower on the coast was finished in 1791 on the headland above the "
    "fishing village of Carrow. It held a ring of oil lamps behind polished copper "
    "reflectors, and its keeper was paid a shilling a night to trim the wicks and clean the "
    "glass. Records from the harbour board show that the light was rarely dark for more than "
    "an hour, even in the great storm of 1803.",
    "During the next fifty years eleven more towers were built along the coast. Each was "
    "given its own pattern of flashes so that a navigator could identify it at night. Some "
    "lights turned slowly on clockwork driven by heavy weights, which the keepers wound by "
    "hand every few hours. Others were fixed but coloured, using red or green glass to mark "
    "the safe channel into a harbour.",
    "Life in the towers was lonely and hard. Keepers lived with their families in small "
    "cottages beside the light, and supplies came by boat once a fortnight when the weather "
    "allowed. Children walked several miles to school, and in winter they sometimes stayed "
    "with relatives in the village for weeks at a time. Letters from keepers' wives describe "
    "long evenings spent mending nets and reading by the lamp.",
    "The arrival of paraffin lamps in the 1870s made the lights brighter and cheaper to run, "
    "and the glass lenses designed by French engineers gathered the light into narrow beams "
    "that could be seen twenty miles out to sea. Several of these lenses survive today, and "
    "one of them can be seen in the maritime museum at Carrow, still mounted on its original "
    "brass frame.",
    "Electric lights reached the coast after the Second World War. They needed less care, and "
    "one by one the towers were converted to run without a resident keeper. The last keeper "
    "left the Carrow light in 1987, taking with him the logbook in which every shift had "
    "been recorded since the tower was built. That logbook is now held by the county record "
    "office and has recently been digitised.",
    "Today most of the towers are still working, controlled from a station on the mainland "
    "and visited only for maintenance. A few have been sold and turned into holiday homes, "
    "and two have become small museums run by volunteers. The keepers' cottages at Carrow "
    "house an exhibition about the families who lived there, with photographs, tools and "
    "the brass bell that once called the keepers to their watch.",
    "Local historians continue to collect stories from the descendants of keepers. Their "
    "recordings, together with the digitised logbooks and harbour board minutes, give a "
    "detailed picture of how the lights were run and how the people who ran them lived. The "
    "society hopes to publish a full history of the coast lights within the next two years.",
]

RECEIPT_LINES = [
    "CORNER BOOKSHOP",
    "12 High Street, Carrow",
    "Tel 01632 960123",
    "",
    "Date 29/11/2026      Till 2",
    "",
    "Harbour Lights (paperback)   8.99",
    "Parish Records Guide        12.50",
    "Map of the Valley            4.25",
    "Greeting card x2             3.00",
    "",
    "Subtotal                    28.74",
    "Discount 10%                -2.87",
    "TOTAL                       25.87",
    "",
    "Card payment                25.87",
    "Thank you for your visit",
]

FAX_PAGES = [
    [
        "FACSIMILE TRANSMISSION",
        "",
        "To: County Record Office, Search Room",
        "From: Carrow Maritime Museum",
        "Pages: 2 including this cover sheet",
        "",
        "Subject: Loan of the Carrow lighthouse logbook",
        "",
        "Thank you for agreeing to lend the logbook for our",
        "summer exhibition. We would like to collect it on",
        "Monday 6 July and return it by the end of September.",
        "The display case will be kept at a steady temperature",
        "and the book will be shown open at a single page.",
    ],
    [
        "CONDITIONS OF LOAN",
        "",
        "1. The logbook stays in its locked case at all times.",
        "2. Light levels must not exceed fifty lux.",
        "3. The page on display is changed once a month.",
        "4. Any damage is reported to the Record Office at once.",
        "",
        "Please sign and return one copy of this page.",
        "",
        "Signed ______________________  Date __________",
    ],
]

# --- drawing helpers ---------------------------------------------------------------------------


@dataclass
class TextCursor:
    """Lays out paragraphs top to bottom inside a column, recording what it drew."""

    page: pymupdf.Page
    left: float
    right: float
    y: float
    drawn: list[str] = field(default_factory=list)

    def heading(self, text: str, size: float, font: str = "hebo") -> None:
        self.paragraph(text, size=size, font=font, space_after=size * 0.6)

    def paragraph(
        self, text: str, size: float = 11, font: str = "helv", space_after: float = 8
    ) -> None:
        lines = wrap_words(text, font, size, self.right - self.left)
        self.page.insert_text(
            (self.left, self.y + size * LINE_SPACING),
            lines,
            fontname=font,
            fontsize=size,
            lineheight=LINE_SPACING,
        )
        self.y += size * LINE_SPACING * len(lines) + space_after
        self.drawn.append(text)


@cache  # long generated PDFs repeat the same paragraphs
def wrap_words(text: str, font: str, size: float, width: float) -> tuple[str, ...]:
    """Greedy word wrap using the font's real advance widths."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and pymupdf.get_text_length(candidate, fontname=font, fontsize=size) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    return tuple(lines)


def draw_ruled_table(
    page: pymupdf.Page, rows: list[list[str]], left: float, top: float, widths: list[float]
) -> float:
    """A table drawn with real lines (what born-digital reports contain); returns its bottom."""
    row_height = 20
    right = left + sum(widths)
    bottom = top + row_height * len(rows)
    shape = page.new_shape()
    for index in range(len(rows) + 1):
        y = top + index * row_height
        shape.draw_line((left, y), (right, y))
    x = left
    for width in [0, *widths]:
        x += width
        shape.draw_line((x, top), (x, bottom))
    shape.finish(color=(0, 0, 0), width=0.8)
    shape.commit()
    for row_index, row in enumerate(rows):
        font = "hebo" if row_index in (0, len(rows) - 1) else "helv"
        x = left
        for cell, width in zip(row, widths, strict=True):
            baseline = top + row_index * row_height + 14
            page.insert_text((x + 5, baseline), cell, fontname=font, fontsize=10)
            x += width
    return bottom


def text_page_pixels(
    lines: list[str], rect: pymupdf.Rect, font: str, size: float, dpi: int, margin: float = 72
) -> np.ndarray:
    """Typesets lines on a scratch page and returns its grayscale render (H, W) uint8."""
    scratch = pymupdf.open()
    page = scratch.new_page(width=rect.width, height=rect.height)
    y = margin
    for line in lines:
        y += size * 1.45
        if line:
            page.insert_text((margin, y), line, fontname=font, fontsize=size)
    pixmap = page.get_pixmap(dpi=dpi, colorspace=pymupdf.csGRAY)
    pixels = np.frombuffer(pixmap.samples, dtype=np.uint8).reshape(pixmap.height, pixmap.width)
    scratch.close()
    return pixels.copy()


def new_pdf() -> pymupdf.Document:
    doc = pymupdf.open()
    doc.set_metadata(FIXED_METADATA)
    return doc


def save_pdf(doc: pymupdf.Document, path: Path) -> None:
    doc.set_metadata(FIXED_METADATA)
    doc.save(path, garbage=4, deflate=True, no_new_id=True)
    doc.close()


# --- samples -----------------------------------------------------------------------------------


def make_report(path: Path) -> list[str]:
    """Three born-digital pages: headings, prose and a ruled table on page 2."""
    doc = new_pdf()
    pages_text: list[str] = []
    layouts = [
        [("title", REPORT_TITLE), *REPORT_SECTIONS[:1]],
        [*REPORT_SECTIONS[1:], ("table", None)],
        REPORT_LAST_SECTIONS,
    ]
    for layout in layouts:
        page = doc.new_page(width=LETTER.width, height=LETTER.height)
        cursor = TextCursor(page, left=72, right=LETTER.width - 72, y=72)
        for heading, body in layout:
            if heading == "title":
                cursor.heading(body, size=20)
            elif heading == "table":
                cursor.paragraph(REPORT_TABLE_INTRO)
                bottom = draw_ruled_table(page, REPORT_TABLE, 72, cursor.y, [170, 80, 100, 100])
                cursor.drawn.append("\n".join(" ".join(row) for row in REPORT_TABLE))
                cursor.y = bottom + 10
                cursor.paragraph(REPORT_TABLE_OUTRO)
            else:
                cursor.heading(heading, size=14)
                for paragraph in body:
                    cursor.paragraph(paragraph)
        page.insert_text(
            (LETTER.width / 2 - 10, LETTER.height - 40),
            f"Page {page.number + 1}",
            fontname="helv",
            fontsize=9,
        )
        pages_text.append("\n".join([*cursor.drawn, f"Page {page.number + 1}"]))
    save_pdf(doc, path)
    return pages_text


def make_scan(path: Path) -> list[str]:
    """An image-only page: typed minutes rendered, tilted and speckled like a photocopy."""
    rng = np.random.default_rng(7)
    pixels = text_page_pixels(SCAN_LINES, LETTER, font="cour", size=11, dpi=150)
    noisy = pixels.astype(np.float32) * 0.92 + 12 + rng.normal(0, 6, pixels.shape)
    specks = rng.random(pixels.shape) < 0.0008
    noisy[specks] = 40
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="L")
    image = image.filter(ImageFilter.GaussianBlur(0.6)).rotate(
        0.8, resample=Image.Resampling.BICUBIC, fillcolor=235
    )
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=55)
    doc = new_pdf()
    page = doc.new_page(width=LETTER.width, height=LETTER.height)
    page.insert_image(page.rect, stream=buffer.getvalue())
    save_pdf(doc, path)
    return ["\n".join(line.strip() for line in SCAN_LINES if line)]


def make_slide(path: Path) -> list[str]:
    """A sparse 16:9 slide: a title and three bullets."""
    doc = new_pdf()
    page = doc.new_page(width=SLIDE.width, height=SLIDE.height)
    page.draw_rect(pymupdf.Rect(0, 0, SLIDE.width, 110), color=None, fill=(0.12, 0.27, 0.45))
    page.insert_text((60, 72), SLIDE_TITLE, fontname="hebo", fontsize=36, color=(1, 1, 1))
    for index, bullet in enumerate(SLIDE_BULLETS):
        y = 200 + index * 80
        page.draw_circle((75, y - 9), 6, color=None, fill=(0.12, 0.27, 0.45))
        page.insert_text((100, y), bullet, fontname="helv", fontsize=28)
    save_pdf(doc, path)
    return ["\n".join([SLIDE_TITLE, *SLIDE_BULLETS])]


def make_two_column(path: Path) -> list[str]:
    """A dense newsletter page: a title across the top, then two justified-looking columns."""
    doc = new_pdf()
    page = doc.new_page(width=LETTER.width, height=LETTER.height)
    title = TextCursor(page, left=54, right=LETTER.width - 54, y=48)
    title.heading(TWO_COLUMN_TITLE, size=18, font="tibo")
    gutter = 18
    column_width = (LETTER.width - 108 - gutter) / 2
    half = len(TWO_COLUMN_PARAGRAPHS) // 2
    drawn = [TWO_COLUMN_TITLE]
    for column, paragraphs in enumerate(
        [TWO_COLUMN_PARAGRAPHS[:half], TWO_COLUMN_PARAGRAPHS[half:]]
    ):
        left = 54 + column * (column_width + gutter)
        cursor = TextCursor(page, left=left, right=left + column_width, y=title.y + 4)
        for paragraph in paragraphs:
            cursor.paragraph(paragraph, size=9.5, font="tiro", space_after=6)
        drawn.extend(cursor.drawn)
    save_pdf(doc, path)
    return ["\n".join(drawn)]


def make_receipt(path: Path) -> list[str]:
    """A till receipt as a PNG (monospaced, narrow, slightly grey paper)."""
    rect = pymupdf.Rect(0, 0, 260, 40 + 15 * len(RECEIPT_LINES))
    pixels = text_page_pixels(RECEIPT_LINES, rect, font="cour", size=10, dpi=200, margin=20)
    paper = (pixels.astype(np.float32) * 0.9 + 14).astype(np.uint8)
    Image.fromarray(paper, mode="L").save(path, format="PNG", dpi=(200, 200), optimize=True)
    return ["\n".join(line for line in RECEIPT_LINES if line)]


def make_fax(path: Path) -> list[str]:
    """A two-page bilevel fax (CCITT Group 4, 200 dpi), the classic multi-page TIFF."""
    frames = []
    for lines in FAX_PAGES:
        pixels = text_page_pixels(lines, LETTER, font="tiro", size=13, dpi=200)
        frames.append(Image.fromarray(pixels, mode="L").point(lambda v: 255 if v > 150 else 0))
    bilevel = [frame.convert("1", dither=Image.Dither.NONE) for frame in frames]
    bilevel[0].save(
        path,
        format="TIFF",
        save_all=True,
        append_images=bilevel[1:],
        compression="group4",
        dpi=(200, 200),
    )
    return ["\n".join(line for line in lines if line) for lines in FAX_PAGES]


def write_long_pdf(path: Path, page_count: int, seed: int = 0) -> Path:
    """A long born-digital PDF for throughput and memory runs (not bundled: it is generated).

    Every page has prose and a small distinct image, so MuPDF has per-page resources to cache.
    """
    rng = random.Random(seed)
    paragraphs = [p for _, body in REPORT_SECTIONS + REPORT_LAST_SECTIONS for p in body]
    doc = new_pdf()
    for number in range(1, page_count + 1):
        page = doc.new_page(width=LETTER.width, height=LETTER.height)
        cursor = TextCursor(page, left=72, right=LETTER.width - 72, y=72)
        cursor.heading(f"Section {number}", size=14)
        for paragraph in rng.sample(paragraphs, 3):
            cursor.paragraph(paragraph)
        swatch = Image.new("L", (32, 32), rng.randrange(256))
        buffer = io.BytesIO()
        swatch.save(buffer, format="PNG")
        page.insert_image(pymupdf.Rect(500, 720, 540, 760), stream=buffer.getvalue())
    save_pdf(doc, path)
    return path


SAMPLES = {
    "report.pdf": make_report,
    "scan.pdf": make_scan,
    "slide.pdf": make_slide,
    "two_column.pdf": make_two_column,
    "receipt.png": make_receipt,
    "fax.tiff": make_fax,
}


def main(out_dir: Path = SAMPLES_DIR) -> None:
    truth: dict[str, list[str]] = {}
    for name, make in SAMPLES.items():
        path = out_dir / name
        truth[name] = make(path)
        print(f"{name:16} {path.stat().st_size / 1024:7.1f} KiB  {len(truth[name])} page(s)")
    (out_dir / "ground_truth.json").write_text(json.dumps(truth, indent=2) + "\n")


if __name__ == "__main__":
    main()
