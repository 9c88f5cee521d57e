"""Render a document in the asked formats and write the files to a folder or an S3 prefix.

One document's failure (its source changed or is gone) fails that document only; the others
are still written, and the caller learns which failed and why.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from infra.db.session import session_scope
from infra.errors import OcrflowError
from infra.settings import PIPELINE_VERSION
from tasks.exports.document import DocumentNotFound, ExportDocument, load_export_document
from tasks.exports.formats import CONTENT_TYPES, SUFFIXES, ExportFormat
from tasks.exports.source import SourceMissing


@dataclass(frozen=True)
class ExportedFile:
    document_id: int
    format: str
    path: str  # a local path or an s3:// URI


@dataclass(frozen=True)
class ExportFailure:
    document_id: int
    error: str


def render(document: ExportDocument, fmt: ExportFormat, workdir: Path) -> bytes:
    """One format's bytes. Only the PDF needs the source (fetched and checked into `workdir`)."""
    from tasks.exports import text_formats

    if fmt is ExportFormat.PDF:
        from tasks.exports.pdf import render_pdf
        from tasks.exports.source import verified_source

        with verified_source(document, workdir) as source:
            return render_pdf(document, source)
    if fmt is ExportFormat.ALTO:
        from tasks.exports.alto import render_alto

        return render_alto(document, software_version=PIPELINE_VERSION)
    renderers = {
        ExportFormat.MD: text_formats.render_markdown,
        ExportFormat.TXT: text_formats.render_text,
        ExportFormat.JSON: text_formats.render_json,
        ExportFormat.JSONL: text_formats.render_jsonl,
    }
    return renderers[fmt](document)


def export_documents(
    *, database_url: str, document_ids: Iterable[int], formats: Iterable[ExportFormat], out: str
) -> tuple[list[ExportedFile], list[ExportFailure]]:
    """Writes `document-<id><suffix>` for each document and format under `out` (a folder,
    created if needed, or `s3://bucket/prefix`)."""
    from botocore.exceptions import BotoCoreError, ClientError

    # What fails one document and not the rest: it is unknown, its source is gone, changed or
    # unreadable (MuPDF raises RuntimeErrors), or S3 refused a read or a write.
    document_errors = (
        DocumentNotFound,
        SourceMissing,
        OcrflowError,
        ValueError,
        OSError,
        RuntimeError,
        BotoCoreError,
        ClientError,
    )
    formats = list(dict.fromkeys(formats))
    written: list[ExportedFile] = []
    failures: list[ExportFailure] = []
    for document_id in document_ids:
        try:
            with session_scope(database_url) as session:
                document = load_export_document(session=session, document_id=document_id)
            written += export_document(document, formats, out, stem=f"document-{document_id}")
        except document_errors as error:
            failures.append(ExportFailure(document_id, f"{type(error).__name__}: {error}"))
    return written, failures


def export_document(
    document: ExportDocument, formats: Iterable[ExportFormat], out: str, *, stem: str
) -> list[ExportedFile]:
    """Renders every format first, then writes them: a document that fails leaves no files."""
    with tempfile.TemporaryDirectory(prefix="ocrflow-export-") as workdir:
        rendered = [(fmt, render(document, fmt, Path(workdir))) for fmt in formats]
    return [
        ExportedFile(document.id, fmt.value, write_file(out, stem + SUFFIXES[fmt], body, fmt))
        for fmt, body in rendered
    ]


def write_file(out: str, name: str, body: bytes, fmt: ExportFormat) -> str:
    """Writes one file under a folder or an S3 prefix; returns its path or URI."""
    if out.startswith("s3://"):
        from infra.s3 import S3Location, parse_s3_uri, s3_client

        folder = parse_s3_uri(out)
        key = folder.as_prefix() + name
        s3_client().put_object(
            Bucket=folder.bucket, Key=key, Body=body, ContentType=CONTENT_TYPES[fmt]
        )
        return S3Location(folder.bucket, key).uri
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return str(path)
