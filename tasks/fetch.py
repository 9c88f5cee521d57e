"""Sources: what a user may pass (files, directories, `s3://` URIs) and staging them locally.

Staging yields a local path plus the content identity (size, sha256) that decides whether a
document was already done. Files are hashed while streaming; nothing is read whole into memory.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from infra.db.repository import DocumentIdentity
from infra.errors import DocumentTooLarge, SourceChanged, UnsupportedDocument
from infra.s3 import S3Object
from infra.settings import Settings

S3_SCHEME = "s3://"
# A directory walk picks these; a file named explicitly is always tried (and fails with a reason).
DOCUMENT_SUFFIXES = frozenset(
    {".pdf", ".xps", ".oxps", ".epub", ".cbz", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}
)
HASH_CHUNK = 1024 * 1024

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """One document to ingest: an absolute local path or an `s3://bucket/key` URI."""

    uri: str
    size_hint: int | None = None  # from a listing, so limits apply before download
    version_id: str | None = None
    etag: str | None = None

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith(S3_SCHEME)


@dataclass(frozen=True)
class StagedFile:
    """A source's bytes on local disk, with the identity the registry keys on."""

    source: Source
    path: Path
    size: int
    sha256: str
    media_type: str | None
    bucket: str | None = None
    key: str | None = None
    version_id: str | None = None
    etag: str | None = None

    def identity(self) -> DocumentIdentity:
        return DocumentIdentity(
            source_uri=self.source.uri,
            sha256=self.sha256,
            size_bytes=self.size,
            media_type=self.media_type,
            bucket=self.bucket,
            key=self.key,
            version_id=self.version_id,
            etag=self.etag,
        )

    def s3_object(self) -> S3Object | None:
        """The S3 version these bytes came from, or None for a local file."""
        if self.bucket is None or self.key is None or self.etag is None:
            return None
        return S3Object(self.bucket, self.key, self.size, self.etag, self.version_id)


def unread_identity(uri: str) -> DocumentIdentity:
    """The identity of a source rejected before its bytes were read (e.g. over the size limit)."""
    path = Path(uri)
    size = path.stat().st_size if not Source(uri).is_s3 and path.is_file() else None
    return DocumentIdentity(source_uri=uri, sha256=None, size_bytes=size)


def resolve_sources(inputs: Iterable[str]) -> list[Source]:
    """Expands directories (recursively, hidden files skipped) and S3 prefixes into documents."""
    sources: list[Source] = []
    for raw in inputs:
        if raw.startswith(S3_SCHEME):
            sources.extend(_s3_sources(raw))
            continue
        path = Path(raw).expanduser().resolve()
        if path.is_dir():
            sources.extend(Source(str(p)) for p in _walk_files(path))
        else:
            sources.append(Source(str(path)))
    return sources


def _walk_files(root: Path) -> Iterator[Path]:
    skipped = 0
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in DOCUMENT_SUFFIXES:
            yield path
        else:
            skipped += 1
    if skipped:
        logger.info("%s: skipped %d files that are not documents by name", root, skipped)


def _s3_sources(uri: str) -> Iterator[Source]:
    from tasks.s3_source import list_s3_objects

    for obj in list_s3_objects(uri):
        yield Source(obj.uri, size_hint=obj.size, version_id=obj.version_id, etag=obj.etag)


@contextmanager
def staged(source: Source, settings: Settings) -> Iterator[StagedFile]:
    """Stages a source for the duration of the block; temporary downloads are removed after."""
    if source.is_s3:
        with tempfile.TemporaryDirectory(prefix="ocrflow-") as tmp:
            yield _stage_s3(source, settings, Path(tmp))
        return
    yield _stage_local(source, settings)


def _stage_local(source: Source, settings: Settings) -> StagedFile:
    path = Path(source.uri)
    if not path.is_file():
        raise UnsupportedDocument(f"not a file: {path}")
    size = path.stat().st_size
    check_size(size, settings)
    return StagedFile(
        source=source,
        path=path,
        size=size,
        sha256=sha256_of(path),
        media_type=mimetypes.guess_type(path.name)[0],
    )


def _stage_s3(source: Source, settings: Settings, tmp: Path) -> StagedFile:
    from tasks.s3_source import download_s3_object, head_s3_object

    obj = head_s3_object(source.uri, version_id=source.version_id)
    if source.etag is not None and obj.etag != source.etag:
        raise SourceChanged(
            f"{source.uri} changed since it was registered ({source.etag} -> {obj.etag})"
        )
    check_size(obj.size, settings)
    path, sha256, size = download_s3_object(obj, tmp, max_bytes=settings.max_file_bytes)
    return StagedFile(
        source=source,
        path=path,
        size=size,
        sha256=sha256,
        media_type=mimetypes.guess_type(obj.key)[0],
        bucket=obj.bucket,
        key=obj.key,
        version_id=obj.version_id,
        etag=obj.etag,
    )


def check_size(size: int, settings: Settings) -> None:
    if size == 0:
        raise UnsupportedDocument("empty file (0 bytes)")
    if size > settings.max_file_bytes:
        raise DocumentTooLarge(
            f"file is {size:,} bytes, over the limit of {settings.max_file_bytes:,} "
            "(OCRFLOW_MAX_FILE_BYTES)"
        )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
