"""A mixed routing corpus: slides, letters, reports, two-column papers, tables and dense
newspaper-like pages, in Latin and CJK, each also as an image-only scan.

Born-digital pages carry a correct text layer, so the token count of their text layer is the
reference the pixel estimator is measured against on their scans. Deterministic for a seed.

    python -m bench.routing_corpus OUT_DIR   # writes one PDF per kind/script/scan + manifest.json
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pymupdf

from bench.corpus_text import CHINESE_SENTENCES, ENGLISH_SENTENCES

KINDS = ("slide", "letter", "report", "two-column", "table", "newspaper")
SCRIPTS = ("latin", "cjk")
A4 = (595.0, 842.0)
SCAN_DPI = 150


@dataclass(frozen=True)
class CorpusFile:
    """One generated PDF and what is in it."""

    path: str
    kind: str
    script: str
    scanned: bool
    pages: int


@dataclass(frozen=True)
class _Typeface:
    regular: str
    bold: str
    script: str

    def sentences(self, rng: random.Random) -> Iterator[str]:
        pool = ENGLISH_SENTENCES if self.script == "latin" else CHINESE_SENTENCES
        while True:
            yield rng.choice(pool)


TYPEFACES = {
    "latin": _Typeface(regular="helv", bold="hebo", script="latin"),
    "cjk": _Typeface(regular="china-s", bold="china-s", script="cjk"),
}
_FONTS: dict[str, pymupdf.Font] = {}


def _font(name: str) -> pymupdf.Font:
    if name not in _FONTS:
        _FONTS[name] = pymupdf.Font(name)
    return _FONTS[name]


def wrap(text: str, fontname: str, size: float, width: float, script: str) -> list[str]:
    """Greedy line breaking: at spaces for Latin, between any two characters for CJK."""
    font = _font(fontname)
    units = text.split(" ") if script == "latin" else list(text)
    joiner = " " if script == "latin" else ""
    lines: list[str] = []
    current = ""
    for unit in units:
        candidate = f"{current}{joiner}{unit}" if current else unit
        if current and font.text_length(candidate, size) > width:
            lines.append(current)
            current = unit
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines


def write_lines(page: pymupdf.Page, x: float, y: float, lines: list[str], fontname: str,
                size: float) -> float:  # fmt: skip
    """Lines at 1.25x leading from baseline `y`; returns the next baseline."""
    for line in lines:
        page.insert_text((x, y), line, fontname=fontname, fontsize=size)
        y += size * 1.25
    return y


def fill_column(page: pymupdf.Page, rect: pymupdf.Rect, sentences: Iterator[str],
                face: _Typeface, size: float, *, paragraphs: int | None = None,
                sentences_per_paragraph: tuple[int, int] = (3, 6),
                rng: random.Random) -> float:  # fmt: skip
    """Paragraphs into `rect` until it is full (or `paragraphs` are written); returns the y
    below the last line."""
    y = rect.y0 + size
    written = 0
    while paragraphs is None or written < paragraphs:
        text_joiner = " " if face.script == "latin" else ""
        text = text_joiner.join(
            next(sentences) for _ in range(rng.randint(*sentences_per_paragraph))
        )
        lines = wrap(text, face.regular, size, rect.width, face.script)
        room = int((rect.y1 - y) // (size * 1.25)) + 1
        if room <= 0:
            break
        y = write_lines(page, rect.x0, y, lines[:room], face.regular, size) + size * 0.5
        written += 1
        if len(lines) > room:
            break
    return y


def _slide(doc: pymupdf.Document, face: _Typeface, rng: random.Random) -> None:
    page = doc.new_page(width=720, height=405)
    page.draw_rect(pymupdf.Rect(0, 0, 720, 70), color=None, fill=(0.15, 0.3, 0.55))
    sentences = face.sentences(rng)
    title = next(sentences)[: 28 if face.script == "latin" else 12]
    page.insert_text((36, 48), title, fontname=face.bold, fontsize=30, color=(1, 1, 1))
    y = 120.0
    for _ in range(rng.randint(3, 5)):
        bullet = next(sentences)
        bullet = bullet[: 48 if face.script == "latin" else 20]
        page.insert_text((50, y), "• " + bullet, fontname=face.regular, fontsize=22)
        y += 52


def _letter(doc: pymupdf.Document, face: _Typeface, rng: random.Random) -> None:
    page = doc.new_page(width=A4[0], height=A4[1])
    sender = (
        ["County Record Office", "12 Castle Street", "Northam NE4 7QT"]
        if face.script == "latin"
        else ["市档案馆", "城堡街十二号", "邮编 100071"]
    )
    write_lines(page, 400, 72, sender, face.regular, 10)
    date = "14 March 2024" if face.script == "latin" else "二零二四年三月十四日"
    write_lines(page, 400, 130, [date], face.regular, 10)
    greeting = "Dear Ms Harland," if face.script == "latin" else "尊敬的哈兰女士："
    write_lines(page, 72, 190, [greeting], face.regular, 11)
    body = pymupdf.Rect(72, 205, A4[0] - 72, A4[1] - 150)
    y = fill_column(page, body, face.sentences(rng), face, 11, paragraphs=rng.randint(2, 4),
                    sentences_per_paragraph=(2, 4), rng=rng)  # fmt: skip
    closing = ["Yours sincerely,", "", "J. Whitfield, Archivist"]
    if face.script == "cjk":
        closing = ["此致", "敬礼", "档案员 王明"]
    write_lines(page, 72, y + 20, closing, face.regular, 11)


def _report(doc: pymupdf.Document, face: _Typeface, rng: random.Random) -> None:
    page = doc.new_page(width=A4[0], height=A4[1])
    sentences = face.sentences(rng)
    heading = "Annual report of the record office" if face.script == "latin" else "档案馆年度报告"
    page.insert_text((72, 90), heading, fontname=face.bold, fontsize=18)
    y = fill_column(page, pymupdf.Rect(72, 110, A4[0] - 72, 460), sentences, face, 10.5,
                    rng=rng)  # fmt: skip
    sub = "Collections and access" if face.script == "latin" else "馆藏与利用"
    page.insert_text((72, y + 14), sub, fontname=face.bold, fontsize=13)
    fill_column(page, pymupdf.Rect(72, y + 24, A4[0] - 72, A4[1] - 72), sentences, face, 10.5,
                rng=rng)  # fmt: skip
    page.insert_text((A4[0] / 2 - 5, A4[1] - 40), str(rng.randint(2, 90)), fontsize=9)


def _two_column(doc: pymupdf.Document, face: _Typeface, rng: random.Random) -> None:
    page = doc.new_page(width=A4[0], height=A4[1])
    sentences = face.sentences(rng)
    title = (
        "Recognising damaged newspaper pages at scale"
        if face.script == "latin"
        else "大规模识别破损报纸页面的方法"
    )
    page.insert_text((60, 70), title, fontname=face.bold, fontsize=16)
    abstract = pymupdf.Rect(60, 90, A4[0] - 60, 170)
    fill_column(page, abstract, sentences, face, 9, paragraphs=1, rng=rng)
    gutter, top = 18, 180
    width = (A4[0] - 120 - gutter) / 2
    for column in range(2):
        x0 = 60 + column * (width + gutter)
        fill_column(page, pymupdf.Rect(x0, top, x0 + width, A4[1] - 60), sentences, face, 9,
                    rng=rng)  # fmt: skip


def _table(doc: pymupdf.Document, face: _Typeface, rng: random.Random) -> None:
    page = doc.new_page(width=A4[0], height=A4[1])
    heading = "Deposits by series, 2015-2023" if face.script == "latin" else "各类档案入藏统计"
    page.insert_text((60, 70), heading, fontname=face.bold, fontsize=14)
    header = (
        ["Series", "Boxes", "Files", "Pages", "Scanned", "Share"]
        if face.script == "latin"
        else ["类别", "箱数", "卷数", "页数", "已扫描", "比例"]
    )
    words = ["Parish", "Court", "School", "Council", "Estate", "Brewery", "Maps", "Press"]
    if face.script == "cjk":
        words = ["教区", "法庭", "学校", "议会", "地产", "酒厂", "地图", "报刊"]
    rows, cols = 28, len(header)
    x0, y0, cell_w, cell_h = 60.0, 90.0, (A4[0] - 120) / cols, 22.0
    for r in range(rows + 2):
        y = y0 + r * cell_h
        page.draw_line((x0, y), (x0 + cols * cell_w, y), width=0.6)
    for c in range(cols + 1):
        x = x0 + c * cell_w
        page.draw_line((x, y0), (x, y0 + (rows + 1) * cell_h), width=0.6)
    for r in range(rows + 1):
        if r == 0:
            cells = header
        else:
            boxes = rng.randint(3, 900)
            cells = [f"{rng.choice(words)} {r}", str(boxes), str(boxes * rng.randint(8, 40)),
                     f"{boxes * rng.randint(300, 900):,}", str(rng.randint(0, boxes)),
                     f"{rng.uniform(0, 100):.1f}%"]  # fmt: skip
        for c, text in enumerate(cells):
            fontname = face.bold if r == 0 else face.regular
            page.insert_text((x0 + c * cell_w + 4, y0 + r * cell_h + 15), text,
                             fontname=fontname, fontsize=9)  # fmt: skip


def _newspaper(doc: pymupdf.Document, face: _Typeface, rng: random.Random) -> None:
    width, height = 792.0, 1224.0
    page = doc.new_page(width=width, height=height)
    sentences = face.sentences(rng)
    masthead = "THE NORTHAM GAZETTE" if face.script == "latin" else "北方日报"
    page.insert_text((40, 70), masthead, fontname=face.bold, fontsize=44)
    page.draw_line((40, 84), (width - 40, 84), width=1.5)
    headline = (
        "Archive opens its doors to the public" if face.script == "latin" else "档案馆向公众开放"
    )
    page.insert_text((40, 118), headline, fontname=face.bold, fontsize=24)
    columns, gutter = 5, 12.0
    col_w = (width - 80 - gutter * (columns - 1)) / columns
    for column in range(columns):
        x0 = 40 + column * (col_w + gutter)
        fill_column(page, pymupdf.Rect(x0, 135, x0 + col_w, height - 40), sentences, face, 8,
                    rng=rng)  # fmt: skip


BUILDERS: dict[str, Callable[[pymupdf.Document, _Typeface, random.Random], None]] = {
    "slide": _slide,
    "letter": _letter,
    "report": _report,
    "two-column": _two_column,
    "table": _table,
    "newspaper": _newspaper,
}


def born_digital(kind: str, script: str, pages: int, seed: int = 0) -> pymupdf.Document:
    """An in-memory PDF of `pages` pages of one kind and script."""
    rng = random.Random(f"{seed}-{kind}-{script}")
    doc = pymupdf.open()
    for _ in range(pages):
        BUILDERS[kind](doc, TYPEFACES[script], rng)
    return doc


def scan_of(source: pymupdf.Document, seed: int = 0, dpi: int = SCAN_DPI) -> pymupdf.Document:
    """An image-only copy of `source`: each page rendered in grey on off-white paper with
    sensor noise, stored as JPEG, no text layer."""
    rng = np.random.default_rng(seed)
    scan = pymupdf.open()
    for page in source:
        pixmap = page.get_pixmap(dpi=dpi, colorspace=pymupdf.csGRAY, alpha=False)
        gray = np.frombuffer(pixmap.samples, np.uint8).reshape(pixmap.height, pixmap.stride)
        gray = gray[:, : pixmap.width].astype(np.float32)
        paper = 236 + rng.normal(0, 6, gray.shape)
        noisy = np.clip(gray / 255 * paper + rng.normal(0, 4, gray.shape), 0, 255)
        image = pymupdf.Pixmap(pymupdf.csGRAY, pixmap.width, pixmap.height,
                               noisy.astype(np.uint8).tobytes(), 0)  # fmt: skip
        target = scan.new_page(width=page.rect.width, height=page.rect.height)
        target.insert_image(target.rect, stream=image.tobytes("jpg", jpg_quality=80))
    return scan


def write_corpus(out_dir: Path, pages_per_file: int = 4, seed: int = 0) -> list[CorpusFile]:
    """Every kind x script, born-digital and scanned, as PDFs plus `manifest.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for kind in KINDS:
        for script in SCRIPTS:
            doc = born_digital(kind, script, pages_per_file, seed)
            for scanned, pdf in ((False, doc), (True, scan_of(doc, seed))):
                name = f"{kind}-{script}{'-scan' if scanned else ''}.pdf"
                pdf.save(out_dir / name, garbage=3, deflate=True)
                files.append(CorpusFile(name, kind, script, scanned, pdf.page_count))
    (out_dir / "manifest.json").write_text(json.dumps([asdict(f) for f in files], indent=2))
    return files


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/routing-corpus")
    for corpus_file in write_corpus(target):
        print(corpus_file.path, corpus_file.pages)
