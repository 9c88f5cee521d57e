"""Write a processed S3 document's results back to S3, under the results prefix.

Layout, per source object `s3://bucket/key`:

    <results prefix><bucket>/<safe key>/document.md      pages joined, in order
    <results prefix><bucket>/<safe key>/document.json    the document, its pages and blocks
    <results prefix><bucket>/<safe key>/figures/page-0003-01.png
    <results prefix><bucket>/<safe key>/document.pdf         searchable (when OCR read a page)
    <results prefix><bucket>/<safe key>/document.alto.xml    ALTO v4
    <results prefix><bucket>/<safe key>/document.txt         plain text

The last three come from the same exporters as `ocrflow export` (`tasks.exports`), written when
the caller passes the stored document.

`OCRFLOW_RESULTS_PREFIX` is a key prefix in the source's bucket (`ocrflow-results/`) or a
full `s3://other-bucket/prefix/`. A source key is never trusted as a path: `..`, empty and
absolute segments, control and odd characters cannot reach outside the prefix.

Two keys never share a results folder (`safe_relative_key` is injective). A key already in
canonical safe form, and not ending like a hash suffix, is its own folder; every other key
becomes its sanitised form plus `~` and 32 hex digits of its SHA-256. The first kind never ends
in `~` + 32 hex digits and the second always does, so they cannot meet; two keys of the second
kind meet only if their hashes share 128 bits. (Nothing shorter can be exact: keys of up to
1,024 bytes outnumber folders that leave room for a prefix.) Distinct folders never share a
file either: every name written under one ends in a part without `/`, and those differ.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.db.queries import document_markdown
from infra.errors import PermanentInputError
from infra.s3 import S3Location, S3Object, check_bucket_name, parse_s3_uri, s3_client
from infra.settings import Settings

if TYPE_CHECKING:
    from tasks.exports.document import ExportDocument

FIGURE_LABELS = frozenset({"image", "figure", "picture", "chart"})
MAX_RELATIVE_KEY_BYTES = 700  # S3 keys stop at 1,024 bytes; leave room for prefix and names
_SAFE_PUNCTUATION = frozenset(" -_.~()+,=@!'")
HASH_HEX_DIGITS = 32  # 128 bits of SHA-256: collisions are out of reach
_HASH_SUFFIX = re.compile(rf"~[0-9a-f]{{{HASH_HEX_DIGITS}}}$")


class UnsafeResultsKey(PermanentInputError):
    """A derived results key would leave the results prefix (a bug guard, never expected)."""


def results_location(source_bucket: str, settings: Settings) -> S3Location:
    """Where results of objects in `source_bucket` go: a bucket and a folder-like prefix."""
    configured = settings.results_prefix
    if not configured.strip("/"):
        raise UnsafeResultsKey("OCRFLOW_RESULTS_PREFIX is empty: results would mix with sources")
    if configured.startswith("s3://"):
        location = parse_s3_uri(configured)
        return S3Location(location.bucket, location.as_prefix())
    return S3Location(source_bucket, S3Location(source_bucket, configured).as_prefix())


def is_results_key(bucket: str, key: str, settings: Settings) -> bool:
    """Whether an object is one of our own results (never to be ingested)."""
    results = results_location(bucket, settings)
    return bucket == results.bucket and key.startswith(results.key)


def safe_relative_key(key: str) -> str:
    """A key-like path for `key` that stays inside any prefix it is appended to; distinct keys
    get distinct paths (see the module docstring for why)."""
    relative = _sanitised(key)
    if relative == key and not _HASH_SUFFIX.search(key):
        return key
    digest = hashlib.sha256(key.encode(errors="surrogatepass")).hexdigest()[:HASH_HEX_DIGITS]
    return f"{relative.rstrip('/')}~{digest}"


def _sanitised(key: str) -> str:
    segments = [_safe_segment(raw) for raw in key.split("/")]
    kept = [segment for segment in segments if segment.strip(".")]  # no "", ".", ".."
    relative = "/".join(kept) or "_"
    if len(relative.encode()) > MAX_RELATIVE_KEY_BYTES:
        relative = relative.encode()[:MAX_RELATIVE_KEY_BYTES].decode(errors="ignore")
    return relative


def _safe_segment(segment: str) -> str:
    normalised = unicodedata.normalize("NFC", segment)
    return "".join(ch if _is_safe(ch) else "_" for ch in normalised)


def _is_safe(ch: str) -> bool:
    return ch in _SAFE_PUNCTUATION or unicodedata.category(ch)[0] in "LNM"


def results_folder(source: S3Location, settings: Settings) -> S3Location:
    """The folder (bucket, prefix ending in `/`) that holds one source object's results."""
    results = results_location(source.bucket, settings)
    # A valid bucket name is all safe characters, so it is its own segment: no two buckets meet.
    folder = f"{results.key}{check_bucket_name(source.bucket)}/{safe_relative_key(source.key)}/"
    if not posixpath.normpath("/" + folder).startswith(posixpath.normpath("/" + results.key)):
        raise UnsafeResultsKey(f"results key {folder!r} escapes {results.key!r}")
    return S3Location(results.bucket, folder)


def write_results(
    source: S3Object,
    view: dict[str, Any],
    settings: Settings,
    *,
    document: ExportDocument | None = None,
) -> list[str]:
    """Uploads markdown, JSON and cropped figures of one document; returns the URIs written.

    `view` is the document as `ocrflow show --format json` prints it. With `document` (its
    stored results, `tasks.exports.document.load_export_document`) the exports are written too:
    plain text, ALTO, and the searchable PDF when any page was read by OCR. The source is
    downloaded once (pinned to its version) for figures and PDF, and only when they need it.
    """
    folder = results_folder(S3Location(source.bucket, source.key), settings)
    written = [
        _put(folder, "document.md", document_markdown(view).encode(), "text/markdown"),
        _put(
            folder,
            "document.json",
            json.dumps(view, indent=2, default=str, ensure_ascii=False).encode(),
            "application/json",
        ),
    ]
    figure_boxes = [
        (page["number"], index, box)
        for page in view["pages"]
        for index, box in enumerate(_figure_boxes(page.get("blocks") or []), start=1)
    ]
    needs_pdf = document is not None and any(page.recognised for page in document.pages)
    if figure_boxes or needs_pdf:
        with tempfile.TemporaryDirectory(prefix="ocrflow-results-") as tmp:
            path = _download_source(source, document, Path(tmp), settings)
            written += _put_figures(path, folder, figure_boxes, settings)
            if document is not None and needs_pdf:
                written.append(_put_export(folder, document, "pdf", path))
    if document is not None:
        written += [_put_export(folder, document, fmt, None) for fmt in ("alto", "txt")]
    return written


def _download_source(
    source: S3Object, document: ExportDocument | None, tmp: Path, settings: Settings
) -> Path:
    """The source version on disk; with a stored document it must be the ingested content."""
    from infra.errors import SourceChanged
    from tasks.s3_source import download_s3_object

    path, sha256, _ = download_s3_object(source, tmp, settings.max_file_bytes)
    if document is not None and document.sha256 and sha256 != document.sha256:
        raise SourceChanged(
            f"{source.uri} is not the content of document {document.id} "
            f"(sha256 {sha256[:12]}…, stored {document.sha256[:12]}…)"
        )
    return path


def _put_export(folder: S3Location, document: ExportDocument, fmt: str, source: Path | None) -> str:
    from tasks.exports.formats import CONTENT_TYPES, SUFFIXES, ExportFormat
    from tasks.exports.writer import render

    export_format = ExportFormat(fmt)
    if export_format is ExportFormat.PDF and source is not None:
        from tasks.exports.pdf import render_pdf

        body = render_pdf(document, source)
    else:
        body = render(document, export_format, Path(tempfile.gettempdir()))
    name = "document" + SUFFIXES[export_format]
    return _put(folder, name, body, CONTENT_TYPES[export_format])


def _figure_boxes(blocks: list[dict[str, Any]]) -> list[list[float]]:
    return [
        box
        for block in blocks
        if block.get("label") in FIGURE_LABELS
        for box in block.get("boxes_page") or []
    ]


def _put_figures(
    path: Path,
    folder: S3Location,
    boxes: list[tuple[int, int, list[float]]],
    settings: Settings,
) -> list[str]:
    import pymupdf

    written: list[str] = []
    if not boxes:
        return written
    with pymupdf.open(path) as document:
        for page_no, index, box in boxes:
            clip = pymupdf.Rect(box) & document[page_no - 1].rect
            if clip.is_empty:
                continue
            pixmap = document[page_no - 1].get_pixmap(clip=clip, dpi=settings.render_dpi)
            name = f"figures/page-{page_no:04d}-{index:02d}.png"
            written.append(_put(folder, name, pixmap.tobytes("png"), "image/png"))
    return written


def _put(folder: S3Location, name: str, body: bytes, content_type: str) -> str:
    key = folder.key + name
    s3_client().put_object(Bucket=folder.bucket, Key=key, Body=body, ContentType=content_type)
    return S3Location(folder.bucket, key).uri
