"""Splitting: every supported format opens with the right page count, every kind of bad input
fails with its typed error and a readable reason, renders respect the pixel cap, and windowed
iteration keeps memory flat on a long PDF."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pymupdf
import pytest
from PIL import Image

from infra.errors import (
    CorruptDocument,
    DocumentTooLarge,
    EmptyDocument,
    EncryptedDocument,
    UnsupportedDocument,
)
from infra.settings import Settings
from tasks.split import open_document
from tests.conftest import REPO_ROOT, SAMPLES_DIR


def page_numbers(path: Path, settings: Settings) -> list[int]:
    with open_document(path, settings) as document:
        return [page.page_no for page in document.iter_pages()]


def text_pdf(path: Path, pages: int) -> Path:
    doc = pymupdf.open()
    for number in range(1, pages + 1):
        doc.new_page().insert_text((72, 72), f"Page {number} of a test document")
    doc.save(path)
    return path


def png_bytes(size: tuple[int, int] = (200, 100), shade: int = 200) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (shade, shade, shade)).save(buffer, format="PNG")
    return buffer.getvalue()


def minimal_xps(path: Path, pages: int) -> Path:
    """A hand-built XPS package: PyMuPDF reads XPS but cannot write it."""
    ns = "http://schemas.microsoft.com/xps/2005/06"
    with zipfile.ZipFile(path, "w") as package:
        package.writestr(
            "[Content_Types].xml",
            '<?xml version="1.0" encoding="utf-8"?>'
            '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" '
            'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="fdseq" '
            'ContentType="application/vnd.ms-package.xps-fixeddocumentsequence+xml"/>'
            '<Default Extension="fdoc" '
            'ContentType="application/vnd.ms-package.xps-fixeddocument+xml"/>'
            '<Default Extension="fpage" '
            'ContentType="application/vnd.ms-package.xps-fixedpage+xml"/></Types>',
        )
        package.writestr(
            "_rels/.rels",
            '<?xml version="1.0" encoding="utf-8"?>'
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            '<Relationship Id="R1" Target="/FixedDocumentSequence.fdseq" Type='
            '"http://schemas.microsoft.com/xps/2005/06/fixedrepresentation"/></Relationships>',
        )
        package.writestr(
            "FixedDocumentSequence.fdseq",
            f'<FixedDocumentSequence xmlns="{ns}">'
            '<DocumentReference Source="/Documents/1/FixedDocument.fdoc"/>'
            "</FixedDocumentSequence>",
        )
        contents = "".join(
            f'<PageContent Source="/Documents/1/Pages/{n}.fpage"/>' for n in range(1, pages + 1)
        )
        package.writestr(
            "Documents/1/FixedDocument.fdoc",
            f'<FixedDocument xmlns="{ns}">{contents}</FixedDocument>',
        )
        for n in range(1, pages + 1):
            package.writestr(
                f"Documents/1/Pages/{n}.fpage",
                f'<FixedPage xmlns="{ns}" Width="816" Height="1056" xml:lang="en-US">'
                '<Path Data="M 96,96 L 720,96 L 720,200 L 96,200 Z" Fill="#FF000000"/>'
                "</FixedPage>",
            )
    return path


def minimal_epub(path: Path, chapters: int) -> Path:
    with zipfile.ZipFile(path, "w") as book:
        book.writestr("mimetype", "application/epub+zip", compress_type=zipfile.ZIP_STORED)
        book.writestr(
            "META-INF/container.xml",
            '<?xml version="1.0"?><container version="1.0" '
            'xmlns="urn:oasis:names:tc:opendocument:xmlns:container"><rootfiles>'
            '<rootfile full-path="OEBPS/content.opf" '
            'media-type="application/oebps-package+xml"/></rootfiles></container>',
        )
        items = "".join(
            f'<item id="c{n}" href="c{n}.xhtml" media-type="application/xhtml+xml"/>'
            for n in range(1, chapters + 1)
        )
        spine = "".join(f'<itemref idref="c{n}"/>' for n in range(1, chapters + 1))
        book.writestr(
            "OEBPS/content.opf",
            '<?xml version="1.0"?><package xmlns="http://www.idpf.org/2007/opf" version="3.0" '
            'unique-identifier="id"><metadata xmlns:dc="http://purl.org/dc/elements/1.1/">'
            '<dc:identifier id="id">test-book</dc:identifier><dc:title>Test</dc:title>'
            f"<dc:language>en</dc:language></metadata><manifest>{items}</manifest>"
            f"<spine>{spine}</spine></package>",
        )
        for n in range(1, chapters + 1):
            book.writestr(
                f"OEBPS/c{n}.xhtml",
                '<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml"><head>'
                f"<title>Chapter {n}</title></head><body><h1>Chapter {n}</h1>"
                "<p>A short chapter.</p></body></html>",
            )
    return path


# --- every format ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "media_type", "pages"),
    [
        ("report.pdf", "application/pdf", 3),
        ("scan.pdf", "application/pdf", 1),
        ("slide.pdf", "application/pdf", 1),
        ("two_column.pdf", "application/pdf", 1),
        ("receipt.png", "image/png", 1),
        ("fax.tiff", "image/tiff", 2),
    ],
)
def test_bundled_samples_open_with_their_page_counts(
    name: str, media_type: str, pages: int, settings: Settings
) -> None:
    with open_document(SAMPLES_DIR / name, settings) as document:
        assert document.media_type == media_type
        assert document.page_count == pages
        assert [page.page_no for page in document.iter_pages()] == list(range(1, pages + 1))


def test_xps_opens(tmp_path: Path, settings: Settings) -> None:
    path = minimal_xps(tmp_path / "doc.xps", pages=2)
    with open_document(path, settings) as document:
        assert document.media_type == "application/vnd.ms-xpsdocument"
        pages = list(document.iter_pages())
        assert [page.page_no for page in pages] == [1, 2]
        assert (pages[0].width, pages[0].height) == pytest.approx((612, 792))  # 816 px at 96 dpi


def test_epub_opens_one_page_per_short_chapter(tmp_path: Path, settings: Settings) -> None:
    path = minimal_epub(tmp_path / "book.epub", chapters=2)
    with open_document(path, settings) as document:
        assert document.media_type == "application/epub+zip"
        assert page_numbers(path, settings) == [1, 2]


def test_cbz_opens_one_page_per_image(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "comic.cbz"
    with zipfile.ZipFile(path, "w") as comic:
        for n in range(3):
            comic.writestr(f"page{n:02}.png", png_bytes(shade=60 * n))
    with open_document(path, settings) as document:
        assert document.media_type == "application/vnd.comicbook+zip"
        assert document.page_count == 3


def test_jpeg_opens_and_renders_at_its_own_resolution(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (640, 480), (120, 30, 30)).save(path, format="JPEG", dpi=(300, 300))
    with open_document(path, settings) as document:
        assert document.media_type == "image/jpeg"
        page = next(document.iter_pages())
        image = page.render(settings.render_dpi)
        assert image.mode == "RGB"
        assert image.size == (640, 480)


def test_format_comes_from_the_bytes_not_the_name(tmp_path: Path, settings: Settings) -> None:
    disguised = tmp_path / "actually-a-pdf.png"
    disguised.write_bytes((SAMPLES_DIR / "report.pdf").read_bytes())
    with open_document(disguised, settings) as document:
        assert document.media_type == "application/pdf"
        assert document.page_count == 3


# --- bad input ---------------------------------------------------------------------------------


def test_encrypted_pdf_is_rejected(tmp_path: Path, settings: Settings) -> None:
    doc = pymupdf.open(text_pdf(tmp_path / "plain.pdf", pages=1))
    path = tmp_path / "locked.pdf"
    doc.save(path, encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="secret", owner_pw="owner")
    with pytest.raises(EncryptedDocument, match="needs a password"):
        open_document(path, settings)


def test_owner_password_only_pdf_still_opens(tmp_path: Path, settings: Settings) -> None:
    doc = pymupdf.open(text_pdf(tmp_path / "plain.pdf", pages=2))
    path = tmp_path / "restricted.pdf"
    doc.save(path, encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw="owner")
    assert page_numbers(path, settings) == [1, 2]


def test_pdf_with_garbage_body_is_corrupt(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "garbage.pdf"
    path.write_bytes(b"%PDF-1.7\n" + os.urandom(4000))
    with pytest.raises(CorruptDocument, match="damaged PDF"):
        open_document(path, settings)


def test_pdf_truncated_to_its_header_is_corrupt(tmp_path: Path, settings: Settings) -> None:
    full = text_pdf(tmp_path / "full.pdf", pages=3).read_bytes()
    path = tmp_path / "truncated.pdf"
    path.write_bytes(full[:200])
    with pytest.raises(CorruptDocument, match="damaged PDF"):
        open_document(path, settings)


def test_pdf_without_pages_is_empty(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "no-pages.pdf"
    path.write_bytes(
        b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
        b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
        b"trailer<</Root 1 0 R>>\n%%EOF\n"
    )
    with pytest.raises(EmptyDocument, match="no pages"):
        open_document(path, settings)


def test_zero_byte_file_is_empty(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "nothing.pdf"
    path.write_bytes(b"")
    with pytest.raises(EmptyDocument, match="0 bytes"):
        open_document(path, settings)


def test_random_bytes_are_unsupported(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "noise.pdf"
    path.write_bytes(bytes([0x00, 0xFE, 0x13, 0x37]) + os.urandom(2000))
    with pytest.raises(UnsupportedDocument, match="unrecognised file format"):
        open_document(path, settings)


def test_text_file_is_unsupported(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "notes.pdf"
    path.write_text("Shopping list\n- bread\n- tea, 2 × 250 g\n", encoding="utf-8")
    with pytest.raises(UnsupportedDocument, match="plain text file"):
        open_document(path, settings)


def test_zip_of_junk_is_unsupported(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "bundle.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a document")
        archive.writestr("data.bin", os.urandom(100))
    with pytest.raises(UnsupportedDocument, match="not an EPUB, XPS or CBZ"):
        open_document(path, settings)


def test_file_over_the_size_limit_is_rejected_before_opening(
    tmp_path: Path, settings: Settings
) -> None:
    small = settings.model_copy(update={"max_file_bytes": 1000})
    with pytest.raises(DocumentTooLarge, match="OCRFLOW_MAX_FILE_BYTES"):
        open_document(SAMPLES_DIR / "report.pdf", small)


def test_document_over_the_page_limit_is_rejected(settings: Settings) -> None:
    few = settings.model_copy(update={"max_pages": 2})
    with pytest.raises(DocumentTooLarge, match="3 pages, over the limit of 2"):
        open_document(SAMPLES_DIR / "report.pdf", few)


# --- pages -------------------------------------------------------------------------------------


def test_render_is_capped_at_max_page_pixels(settings: Settings) -> None:
    capped = settings.model_copy(update={"max_page_pixels": 250_000})
    with open_document(SAMPLES_DIR / "report.pdf", capped) as document:
        page = next(document.iter_pages())
        image = page.render(300)  # 300 dpi would be 2550 x 3300 px
        assert image.width * image.height <= 250_000
        assert image.width / image.height == pytest.approx(612 / 792, rel=0.01)
        assert page.last_render is not None and page.last_render.capped
        assert page.last_render.dpi < 300


def test_render_below_the_cap_uses_the_asked_dpi(settings: Settings) -> None:
    with open_document(SAMPLES_DIR / "report.pdf", settings) as document:
        page = next(document.iter_pages())
        image = page.render(144)
        assert image.size == (1224, 1584)
        assert page.last_render is not None and not page.last_render.capped


def test_iter_pages_honours_start_and_end_across_windows(
    tmp_path: Path, settings: Settings
) -> None:
    path = text_pdf(tmp_path / "ten.pdf", pages=10)
    small_windows = settings.model_copy(update={"page_window": 3})
    with open_document(path, small_windows) as document:
        assert [page.page_no for page in document.iter_pages(start=4, end=9)] == list(range(4, 10))


def test_page_kept_past_its_window_still_reads(tmp_path: Path, settings: Settings) -> None:
    path = text_pdf(tmp_path / "five.pdf", pages=5)
    small_windows = settings.model_copy(update={"page_window": 2})
    with open_document(path, small_windows) as document:
        pages = list(document.iter_pages())
        assert "Page 1 of a test document" in pages[0].fitz_page.get_text()
        assert pages[0].render(72).size == (595, 842)  # A4, PyMuPDF's default page


MEMORY_PROBE = """
import json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from infra.settings import Settings
from tasks.split import open_document

def rss_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20

settings = Settings(database_url="sqlite://", page_window=64)
samples = []
with open_document(Path({path!r}), settings) as document:
    for page in document.iter_pages():
        page.fitz_page.get_text("dict")
        page.render(36)
        if page.page_no % 128 == 0:
            samples.append(rss_mib())
print(json.dumps(samples))
"""


@pytest.fixture(scope="module")
def long_pdf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from samples.make_samples import write_long_pdf

    return write_long_pdf(tmp_path_factory.mktemp("long") / "long.pdf", page_count=2000)


def test_windowed_iteration_keeps_memory_flat_over_2000_pages(long_pdf: Path) -> None:
    probe = MEMORY_PROBE.format(root=str(REPO_ROOT), path=str(long_pdf))
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300
    )
    samples = json.loads(completed.stdout.strip().splitlines()[-1])
    assert len(samples) == 2000 // 128
    growth = max(samples[1:]) - samples[0]  # after the first window's one-off allocations
    assert growth < 8, f"RSS grew {growth:.1f} MiB over 2,000 pages: {samples}"
