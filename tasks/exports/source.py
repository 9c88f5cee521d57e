"""The source bytes a PDF export starts from, checked against what was ingested.

A searchable PDF is the original pages plus a layer placed by stored coordinates; laid over
different pages it would put words in the wrong places. So the source must still hash to the
sha256 recorded at ingest, or the export of that document fails and says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infra.errors import SourceChanged
from tasks.exports.document import ExportDocument
from tasks.fetch import sha256_of


class SourceMissing(FileNotFoundError):
    pass


@contextmanager
def verified_source(document: ExportDocument, workdir: Path) -> Iterator[Path]:
    """A local path to the document's source whose content is the ingested one."""
    if document.is_s3:
        path = _download(document, workdir)
    else:
        path = Path(document.source_uri)
        if not path.is_file():
            raise SourceMissing(f"document {document.id}: source {path} no longer exists")
    actual = sha256_of(path)
    if document.sha256 is not None and actual != document.sha256:
        raise SourceChanged(
            f"document {document.id}: source {document.source_uri} changed since it was "
            f"ingested (sha256 {document.sha256[:12]}… then, {actual[:12]}… now); "
            "ingest it again to export it"
        )
    yield path


def _download(document: ExportDocument, workdir: Path) -> Path:
    from tasks.s3_source import download_s3_object, head_s3_object

    # The recorded version when the bucket keeps versions; else whatever is there now, which
    # the hash check then accepts or refuses.
    obj = head_s3_object(document.source_uri, version_id=document.version_id)
    path, _sha256, _size = download_s3_object(obj, workdir, max_bytes=obj.size + 1)
    return path
