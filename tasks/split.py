"""Opening documents and handing out their pages, a window at a time.

PyMuPDF opens every supported format (PDF, XPS, EPUB, CBZ, PNG, JPEG, multi-page TIFF) as a
document of pages. The format is decided from the file's bytes, never its name, and every
limit is checked before any page is touched, so a bad or oversized file fails fast with a
reason a user can act on.
"""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pymupdf
from PIL import Image

from infra.errors import (
    CorruptDocument,
    DocumentTooLarge,
    EmptyDocument,
    EncryptedDocument,
    UnreadablePage,
    UnsupportedDocument,
)
from infra.settings import Settings
from tasks.orientation import (
    OrientationSource,
    PageOrientation,
    text_layer_orientation,
    upright_size,
)

if TYPE_CHECKING:
    from models.engine import OcrResult

logger = logging.getLogger(__name__)
# MuPDF prints its errors on stdout, which would corrupt `--json` output; we read them from its
# warnings log instead (`_mupdf_reason`).
pymupdf.TOOLS.mupdf_display_errors(False)

SUPPORTED_FORMATS = "PDF, XPS, EPUB, CBZ, PNG, JPEG, TIFF"
SNIFF_BYTES = 1024  # the PDF header may sit anywhere in the first 1 KiB (ISO 32000 leniency)
POINTS_PER_INCH = 72

# media type -> PyMuPDF filetype
PYMUPDF_FILETYPES = {
    "application/pdf": "pdf",
    "application/vnd.ms-xpsdocument": "xps",
    "application/epub+zip": "epub",
    "application/vnd.comicbook+zip": "cbz",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/tiff": "tiff",
}
RASTER_MEDIA_TYPES = frozenset({"image/png", "image/jpeg", "image/tiff"})
COMIC_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")


# --- format detection --------------------------------------------------------------------------


def detect_media_type(path: Path) -> str:
    """The document's media type from its magic bytes; raises for anything we cannot open."""
    with path.open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
    if not head:
        raise EmptyDocument("empty file (0 bytes)")
    if b"%PDF-" in head:
        return "application/pdf"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    if head.startswith(b"PK\x03\x04"):
        return _zip_media_type(path)
    if _looks_like_text(head):
        raise UnsupportedDocument(
            f"plain text file, not a document (supported: {SUPPORTED_FORMATS})"
        )
    raise UnsupportedDocument(
        f"unrecognised file format (first bytes {head[:8].hex(' ')}; "
        f"supported: {SUPPORTED_FORMATS})"
    )


def _zip_media_type(path: Path) -> str:
    """EPUB, XPS and CBZ are all zip files; their member names tell them apart."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if "mimetype" in names and archive.read("mimetype").strip() == b"application/epub+zip":
                return "application/epub+zip"
            lowered = [name.lower() for name in names]
            if any(name.endswith(".fdseq") for name in lowered):
                return "application/vnd.ms-xpsdocument"
            files = [name for name in lowered if not name.endswith("/")]
            if files and all(name.endswith(COMIC_IMAGE_SUFFIXES) for name in files):
                return "application/vnd.comicbook+zip"
    except (zipfile.BadZipFile, OSError, KeyError) as exc:
        raise CorruptDocument(f"damaged zip container: {exc}") from exc
    raise UnsupportedDocument(
        f"zip archive that is not an EPUB, XPS or CBZ (supported: {SUPPORTED_FORMATS})"
    )


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # a multi-byte character cut at the sniff boundary is still text
        return exc.start >= len(head) - 3
    return True


# --- pages -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderSize:
    """The scale a page renders at. `capped` says the pixel limit overrode the asked DPI."""

    dpi: float
    width_px: int
    height_px: int
    capped: bool


@dataclass(eq=False)
class SourcePage:
    """One page of an open document.

    `width`/`height` are in points (for images: pixels at the image's own resolution, as
    PyMuPDF reports them). The live `fitz_page` is loaded on demand and dropped when its window
    ends; it is valid only while the document is open.
    """

    document: SplitDocument = field(repr=False)
    page_no: int  # 1-based
    width: float
    height: float
    _page: pymupdf.Page | None = field(default=None, repr=False)
    last_render: RenderSize | None = None
    unreadable: str | None = None  # why the page cannot be loaded (its size is then 0 x 0)
    _orientation: PageOrientation | None = field(default=None, repr=False)

    @property
    def fitz_page(self) -> pymupdf.Page:
        if self.unreadable is not None:
            raise UnreadablePage(self.unreadable)
        if self._page is None:
            self._page = self.document.load_fitz_page(self.page_no)
        return self._page

    @property
    def orientation(self) -> PageOrientation:
        """Which way the page's text runs as displayed, from /Rotate and the text layer
        (computed once per page; images have no text layer and count as upright here)."""
        if self._orientation is None:
            page = self.fitz_page  # an unreadable page raises here, as for any other use
            try:
                raster = self.document.is_raster
                self._orientation = PageOrientation() if raster else text_layer_orientation(page)
            except (RuntimeError, ValueError) as exc:  # a damaged text layer: render as is
                logger.info("page %d: text direction unreadable (%s)", self.page_no, exc)
                self._orientation = PageOrientation()
        return self._orientation

    @property
    def rotation(self) -> int:
        """Clockwise degrees the page's text is turned; `render` turns it back."""
        return self.orientation.angle

    @property
    def upright_size(self) -> tuple[float, float]:
        """(width, height) in points of the page as `render` draws it."""
        return upright_size(self.width, self.height, self.rotation)

    def release(self) -> None:
        """Drops the live page so MuPDF can free its resources."""
        self._page = None

    def render_size(self, dpi: float) -> RenderSize:
        """The size a render at `dpi` gets: raster sources at their own resolution, and never
        more than `max_page_pixels` (the DPI is scaled down to fit)."""
        if self.document.is_raster:
            dpi = self.native_dpi()
        limit = self.document.settings.max_page_pixels
        zoom = dpi / POINTS_PER_INCH
        capped = _pixels(self.width, self.height, zoom) > limit
        if capped:
            zoom = math.sqrt(limit / (self.width * self.height))
            while _pixels(self.width, self.height, zoom) > limit:  # ceil() rounding at the edge
                zoom *= 0.999
        width_px, height_px = math.ceil(self.width * zoom), math.ceil(self.height * zoom)
        if self.rotation in (90, 270):  # rendered upright: a sideways page's sides swap
            width_px, height_px = height_px, width_px
        return RenderSize(
            dpi=zoom * POINTS_PER_INCH, width_px=width_px, height_px=height_px, capped=capped
        )

    def native_dpi(self) -> float:
        """A raster page's own resolution: rendering at it reproduces the source pixels."""
        images = self.fitz_page.get_image_info()
        if not images:
            return float(self.document.settings.render_dpi)
        return images[0]["width"] * POINTS_PER_INCH / self.width

    def render(self, dpi: int | float, *, check_pixels: bool = False) -> Image.Image:
        """The page upright as an RGB image, straight from the pixmap (no encode round trip).

        A page whose text runs sideways or upside down (`orientation`) is turned back, so
        every engine gets upright text; the image then has the upright page's proportions.
        `check_pixels`: a page without a text layer to tell its direction (a scan) is turned
        by its pixels (`models.orientation`, 0.05-0.3 s), for engines that have no check of
        their own (DeepSeek-OCR); RapidOCR checks while it reads, at a tenth of that."""
        size = self.render_size(dpi)
        if size.capped:
            logger.info(
                "page %d rendered at %.0f dpi instead of %s: %d px cap",
                self.page_no,
                size.dpi,
                dpi,
                self.document.settings.max_page_pixels,
            )
        zoom = size.dpi / POINTS_PER_INCH
        try:
            # PyMuPDF's rotation is clockwise on screen (y down); turning back is negative.
            matrix = pymupdf.Matrix(zoom, zoom).prerotate(-self.rotation)
            pixmap = self.fitz_page.get_pixmap(matrix=matrix, colorspace=pymupdf.csRGB, alpha=False)
        except (RuntimeError, ValueError) as exc:
            raise UnreadablePage(f"page {self.page_no} cannot be rendered: {exc}") from exc
        image = Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples_mv)
        image.info["dpi"] = (size.dpi, size.dpi)
        self.last_render = size
        if check_pixels and self.orientation.source == OrientationSource.NONE:
            image = self._turn_by_pixels(image)
        image.info["rotation"] = self.rotation
        return image

    def _turn_by_pixels(self, image: Image.Image) -> Image.Image:
        """`image` turned upright by its text lines; the finding becomes the page's orientation
        (so later renders come out upright straight from the pixmap)."""
        from models.orientation import detect_pixel_orientation, shared_detector

        found = detect_pixel_orientation(shared_detector(), image)
        self._orientation = PageOrientation(
            angle=found.angle,
            source=OrientationSource.PIXELS,
            page_rotate=self.orientation.page_rotate,
            confidence=found.confidence,
        )
        turned = found.upright(image)
        turned.info.update(image.info)
        return turned

    def text_layer_result(self) -> OcrResult:
        """The page's own text layer as an engine result (the `text-layer` route)."""
        from models.text_layer import read_text_layer

        return read_text_layer(self.fitz_page, key=str(self.page_no))


def _pixels(width: float, height: float, zoom: float) -> int:
    return math.ceil(width * zoom) * math.ceil(height * zoom)


# --- documents ---------------------------------------------------------------------------------


class SplitDocument:
    """An open document whose pages are handed out in windows; use as a context manager."""

    def __init__(
        self, doc: pymupdf.Document, path: Path, media_type: str, settings: Settings
    ) -> None:
        self._doc = doc
        self._path = path
        self.media_type = media_type
        self.settings = settings
        self.page_count: int = doc.page_count
        self.repaired: bool = bool(getattr(doc, "is_repaired", False))

    @property
    def is_raster(self) -> bool:
        return self.media_type in RASTER_MEDIA_TYPES

    def __enter__(self) -> SplitDocument:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._doc.is_closed:
            self._doc.close()

    def load_fitz_page(self, page_no: int) -> pymupdf.Page:
        if self._doc.is_closed:
            raise RuntimeError(f"page {page_no} used after its document was closed")
        try:
            return self._doc.load_page(page_no - 1)
        except (RuntimeError, ValueError) as exc:
            raise UnreadablePage(f"page {page_no} cannot be read: {exc}") from exc

    def iter_pages(self, start: int = 1, end: int | None = None) -> Iterator[SourcePage]:
        """Pages `start..end` (1-based, inclusive), `page_window` at a time. A page that cannot
        be loaded comes as a `SourcePage` whose `unreadable` says why.

        Between windows the live pages are dropped and the document is recycled, so memory
        stays flat however long the document is. A caller that keeps a `SourcePage` past its
        window can still use it (the page reloads on demand); a raw `fitz_page` it kept cannot.
        """
        last = self.page_count if end is None else min(end, self.page_count)
        if start < 1 or start > last + 1:
            raise ValueError(f"start page {start} outside 1..{self.page_count}")
        window = max(1, self.settings.page_window)
        for index, window_start in enumerate(range(start, last + 1, window)):
            if index:
                self._recycle()
            pages: list[SourcePage] = []
            try:
                for page_no in range(window_start, min(window_start + window, last + 1)):
                    try:
                        page = self._source_page(page_no)
                    except UnreadablePage as exc:  # the caller records it; the rest goes on
                        page = SourcePage(self, page_no, 0.0, 0.0, unreadable=str(exc))
                    pages.append(page)
                    yield page
            finally:
                for page in pages:
                    page.release()

    def _recycle(self) -> None:
        """Frees what MuPDF accumulated over a window.

        Emptying the resource store alone still let RSS creep (parsed objects stay in the
        document's xref cache: +4 MB over 2,000 pages); reopening kept it flat for ~10% more
        time. Reflowable documents (EPUB) are not reopened: that would lay the book out again.
        """
        pymupdf.TOOLS.store_shrink(100)
        if self._doc.is_reflowable:
            return
        self._doc.close()
        self._doc = pymupdf.open(self._path, filetype=PYMUPDF_FILETYPES[self.media_type])

    def _source_page(self, page_no: int) -> SourcePage:
        fitz_page = self.load_fitz_page(page_no)
        rect = fitz_page.rect
        if rect.is_empty:
            raise UnreadablePage(f"page {page_no} has an empty page box ({rect})")
        return SourcePage(self, page_no, rect.width, rect.height, _page=fitz_page)


def open_document(path: Path, settings: Settings) -> SplitDocument:
    """Opens a local file after checking its format and limits; raises a typed error (whose
    message is the user-facing reason) for anything that cannot be split."""
    path = Path(path)
    size = path.stat().st_size
    if size > settings.max_file_bytes:
        raise DocumentTooLarge(
            f"file is {size:,} bytes, over the limit of {settings.max_file_bytes:,} "
            "(OCRFLOW_MAX_FILE_BYTES)"
        )
    media_type = detect_media_type(path)
    pymupdf.TOOLS.mupdf_warnings()  # start this file's warning log empty
    try:
        doc = pymupdf.open(path, filetype=PYMUPDF_FILETYPES[media_type])
    except (RuntimeError, ValueError) as exc:  # pymupdf.FileDataError is a RuntimeError
        raise CorruptDocument(_mupdf_reason(f"damaged {_format_name(media_type)} file")) from exc
    try:
        _check_openable(doc, media_type, settings)
    except BaseException:
        doc.close()
        raise
    return SplitDocument(doc, path, media_type, settings)


def _check_openable(doc: pymupdf.Document, media_type: str, settings: Settings) -> None:
    if doc.needs_pass:
        raise EncryptedDocument("document is encrypted and needs a password")
    try:
        page_count = doc.page_count
    except (RuntimeError, ValueError) as exc:
        reason = f"damaged {_format_name(media_type)} file, its pages cannot be found"
        raise CorruptDocument(_mupdf_reason(reason)) from exc
    if page_count == 0:
        raise EmptyDocument(_mupdf_reason("document has no pages"))
    if page_count > settings.max_pages:
        raise DocumentTooLarge(
            f"document has {page_count:,} pages, over the limit of {settings.max_pages:,} "
            "(OCRFLOW_MAX_PAGES)"
        )


def _format_name(media_type: str) -> str:
    return PYMUPDF_FILETYPES[media_type].upper()


def _mupdf_reason(what: str) -> str:
    warnings = pymupdf.TOOLS.mupdf_warnings()
    return f"{what}: {_first_line(warnings)}" if warnings else what


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0]
