"""The end-to-end benchmark's corpus: a few long PDFs mixing born-digital and scanned pages.

    python -m bench.e2e_corpus OUT_DIR [--pages 2000] [--documents 8]

Each document interleaves, in a seeded random order, pages of every kind an archive holds, so
routing sends pages to the text layer, to every DeepSeek-OCR mode and to `blank`, and a run
cut short still sees the whole mix. The page builders are `bench.routing_corpus`'s (slides,
letters, reports, two-column papers, tables, newspapers) plus two added here for the single-view
modes the routing corpus never reaches: `book` (a full page of body text: Base) and `ledger`
(a tall narrow strip in small type, too fine for Base's view: Large). Scans are rendered in grey
with paper and sensor noise and stored as JPEG (`routing_corpus.scan_of`). Pages are built in
parallel, a chunk per process, and the result is the same for a seed whatever the process count.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pymupdf
from PIL import Image

from bench import routing_corpus
from bench.routing_corpus import A4, BUILDERS, SCAN_DPI, TYPEFACES, _Typeface, fill_column

CHUNK_PAGES = 25  # pages built by one process task
NOISE_SHAPE = (3400, 2300)  # pixels: larger than any page here at SCAN_DPI, plus the offsets
NOISE_OFFSETS = 512
# (kind, scanned) -> share of the corpus. Mostly scans, as in archive digitisation; light pages
# (slides, letters, reports) outnumber dense ones, so outputs average a few hundred tokens.
MIX: dict[tuple[str, bool], float] = {
    ("letter", False): 0.06,
    ("report", False): 0.06,
    ("two-column", False): 0.04,
    ("book", False): 0.04,
    ("table", False): 0.02,
    ("newspaper", False): 0.01,
    ("slide", True): 0.15,
    ("letter", True): 0.15,
    ("report", True): 0.14,
    ("book", True): 0.12,
    ("ledger", True): 0.06,
    ("two-column", True): 0.05,
    ("table", True): 0.05,
    ("newspaper", True): 0.03,
    ("blank", True): 0.02,
}


@dataclass(frozen=True)
class CorpusDocument:
    """One generated PDF and how many pages of each kind it holds."""

    path: str
    pages: int
    kinds: dict[str, int]


def _book(doc: pymupdf.Document, face: _Typeface, rng: random.Random) -> None:
    """A page of a printed book: one column of body text from margin to margin."""
    page = doc.new_page(width=A4[0], height=A4[1])
    body = pymupdf.Rect(60, 60, A4[0] - 60, A4[1] - 50)
    fill_column(page, body, face.sentences(rng), face, 9, rng=rng)
    page.insert_text((A4[0] / 2 - 5, A4[1] - 30), str(rng.randint(3, 400)), fontsize=9)


def _ledger(doc: pymupdf.Document, face: _Typeface, rng: random.Random) -> None:
    """A tall, narrow register strip in small type: legible in Large's 1280-pixel view but not
    in Base's 1024."""
    width, height = 360.0, 1300.0
    page = doc.new_page(width=width, height=height)
    page.insert_text((24, 40), "Register of deposits", fontname=face.bold, fontsize=10)
    body = pymupdf.Rect(24, 56, width - 24, 56 + rng.uniform(0.2, 0.3) * (height - 80))
    fill_column(page, body, face.sentences(rng), face, 6.2, rng=rng)


def _blank(doc: pymupdf.Document, face: _Typeface, rng: random.Random) -> None:
    """An empty page (the back of a leaf): its scan is paper noise alone."""
    doc.new_page(width=A4[0], height=A4[1])


PAGE_BUILDERS = {**BUILDERS, "book": _book, "ledger": _ledger, "blank": _blank}
_ADVANCES: dict[tuple[str, str], float] = {}  # (font, character) -> advance at 1 pt


def _text_length(text: str, fontname: str, size: float) -> float:
    """`Font.text_length` from cached per-character advances (the builders measure every
    candidate line, and MuPDF's per-call cost made that most of a page's build time)."""
    total = 0.0
    for character in text:
        key = (fontname, character)
        if key not in _ADVANCES:
            _ADVANCES[key] = routing_corpus._font(fontname).text_length(character, 1.0)
        total += _ADVANCES[key]
    return total * size


def _wrap(text: str, fontname: str, size: float, width: float, script: str) -> list[str]:
    """`routing_corpus.wrap` with cached advances: the same greedy line breaks."""
    units = text.split(" ") if script == "latin" else list(text)
    joiner = " " if script == "latin" else ""
    lines: list[str] = []
    current, current_length = "", 0.0
    joiner_length = _text_length(joiner, fontname, size)
    for unit in units:
        unit_length = _text_length(unit, fontname, size)
        candidate_length = current_length + joiner_length + unit_length if current else unit_length
        if current and candidate_length > width:
            lines.append(current)
            current, current_length = unit, unit_length
        else:
            current = f"{current}{joiner}{unit}" if current else unit
            current_length = candidate_length
    if current:
        lines.append(current)
    return lines


def _write_lines(
    page: pymupdf.Page, x: float, y: float, lines: list[str], fontname: str, size: float
) -> float:
    """`routing_corpus.write_lines` in one MuPDF call per paragraph (same 1.25x leading)."""
    if lines:
        page.insert_text((x, y), lines, fontname=fontname, fontsize=size, lineheight=1.25)
    return y + len(lines) * size * 1.25


# The routing corpus's builders look these up at call time; the faster versions lay out the
# same text the same way.
routing_corpus.wrap = _wrap
routing_corpus.write_lines = _write_lines


_NOISE: list[np.ndarray] = []


def _noise(rng: random.Random, height: int, width: int) -> np.ndarray:
    """A `(height, width)` window of unit Gaussian noise at a seeded offset into one field
    drawn per process (drawing fresh noise for every page took most of a scan's build time)."""
    if not _NOISE:
        _NOISE.append(np.random.default_rng(0).standard_normal(NOISE_SHAPE, dtype=np.float32))
    top, left = rng.randrange(NOISE_OFFSETS), rng.randrange(NOISE_OFFSETS)
    return _NOISE[0][top : top + height, left : left + width]


def scan(page: pymupdf.Page, rng: random.Random, dpi: int = SCAN_DPI) -> pymupdf.Document:
    """An image-only copy of `page` like `routing_corpus.scan_of`: rendered in grey on
    off-white paper with sensor noise, stored as JPEG, no text layer."""
    pixmap = page.get_pixmap(dpi=dpi, colorspace=pymupdf.csGRAY, alpha=False)
    gray = np.frombuffer(pixmap.samples, np.uint8).reshape(pixmap.height, pixmap.stride)
    gray = gray[:, : pixmap.width].astype(np.float32)
    paper = 236 + 6 * _noise(rng, *gray.shape)
    noisy = np.clip(gray / 255 * paper + 4 * _noise(rng, *gray.shape), 0, 255)
    jpeg = io.BytesIO()  # Pillow's libjpeg-turbo encodes several times faster than MuPDF's
    Image.fromarray(noisy.astype(np.uint8), "L").save(jpeg, "JPEG", quality=80)
    out = pymupdf.open()
    target = out.new_page(width=page.rect.width, height=page.rect.height)
    target.insert_image(target.rect, stream=jpeg.getvalue())
    return out


def page_plan(pages: int, documents: int, seed: int) -> list[list[tuple[str, bool]]]:
    """Each document's pages as (kind, scanned), the mix's counts (largest remainder) dealt out
    in one seeded shuffle."""
    exact = {key: share * pages for key, share in MIX.items()}
    counts = {key: int(value) for key, value in exact.items()}
    by_remainder = sorted(exact, key=lambda key: exact[key] - counts[key], reverse=True)
    for key in by_remainder[: pages - sum(counts.values())]:
        counts[key] += 1
    order = [key for key, count in counts.items() for _ in range(count)]
    random.Random(seed).shuffle(order)
    size = -(-pages // documents)
    return [order[start : start + size] for start in range(0, pages, size)]


def build_chunk(task: tuple[int, int, list[tuple[str, bool]], int]) -> bytes:
    """PDF bytes of one chunk of a document's pages (seeded by document, chunk and page)."""
    document, chunk, kinds, seed = task
    out = pymupdf.open()
    for index, (kind, scanned) in enumerate(kinds):
        page_seed = f"{seed}-{document}-{chunk}-{index}"
        rng = random.Random(page_seed)
        script = "cjk" if rng.random() < 0.15 and kind not in ("ledger", "blank") else "latin"
        source = pymupdf.open()
        PAGE_BUILDERS[kind](source, TYPEFACES[script], rng)
        if scanned:
            source = scan(source[0], rng)
        out.insert_pdf(source)
    return out.tobytes(garbage=3, deflate=True)


def write_corpus(
    out_dir: Path, pages: int = 2000, documents: int = 8, seed: int = 0, workers: int | None = None
) -> list[CorpusDocument]:
    """`documents` PDFs holding `pages` pages in all, plus `manifest.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = page_plan(pages, documents, seed)
    tasks = [
        (number, start // CHUNK_PAGES, kinds[start : start + CHUNK_PAGES], seed)
        for number, kinds in enumerate(plans)
        for start in range(0, len(kinds), CHUNK_PAGES)
    ]
    workers = workers or min(len(tasks), os.cpu_count() or 1)
    # Spawned, not forked: the caller may hold database connections and threads.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        chunks = list(pool.map(build_chunk, tasks))
    written = []
    for number, kinds in enumerate(plans):
        document = pymupdf.open()
        for (chunk_document, *_), data in zip(tasks, chunks, strict=True):
            if chunk_document == number:
                document.insert_pdf(pymupdf.open(stream=data, filetype="pdf"))
        name = f"archive-{number + 1:02d}.pdf"
        document.save(out_dir / name, garbage=3, deflate=True)
        tally = Counter(f"{kind}{'-scan' if scanned else ''}" for kind, scanned in kinds)
        written.append(CorpusDocument(name, document.page_count, dict(sorted(tally.items()))))
    manifest = {"seed": seed, "documents": [asdict(document) for document in written]}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for document in write_corpus(args.out_dir, args.pages, args.documents, args.seed):
        print(document.path, document.pages, document.kinds)


if __name__ == "__main__":
    main()
