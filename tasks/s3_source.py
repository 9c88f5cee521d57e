"""Reading S3: list a prefix page by page, HEAD one object, stream one version to disk.

Limits are enforced before a byte is downloaded (from the listed or HEAD size) and again while
streaming, in case the object grew. Bytes go to a temporary file and are hashed on the way;
an object is never held whole in memory.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from botocore.exceptions import ClientError

from infra.errors import DocumentTooLarge, PermanentInputError, TransientError
from infra.s3 import (
    S3Object,
    normalise_etag,
    normalise_version_id,
    parse_s3_uri,
    s3_client,
)

__all__ = [
    "DownloadedObject",
    "S3ObjectChanged",
    "S3ObjectNotFound",
    "download_s3_object",
    "head_s3_object",
    "list_s3_objects",
    "list_s3_pages",
    "parse_s3_uri",
]

DOWNLOAD_CHUNK = 1024 * 1024
LIST_PAGE_SIZE = 1000  # the most S3 returns per request


class S3ObjectNotFound(PermanentInputError):
    """No such object (or no object under the prefix)."""


class S3ObjectChanged(TransientError):
    """The object was overwritten between HEAD and download; a retry fetches the new version."""


class DownloadedObject(NamedTuple):
    path: Path
    sha256: str
    size: int


def head_s3_object(uri: str, *, version_id: str | None = None) -> S3Object:
    """The current (or the given) version of one object."""
    location = parse_s3_uri(uri)
    request = {"Bucket": location.bucket, "Key": location.key}
    if version_id:
        request["VersionId"] = version_id
    try:
        response = s3_client().head_object(**request)
    except ClientError as exc:
        raise _translated(exc, uri) from exc
    return S3Object(
        bucket=location.bucket,
        key=location.key,
        size=response["ContentLength"],
        etag=normalise_etag(response["ETag"]),
        version_id=normalise_version_id(response.get("VersionId")),
        last_modified=response.get("LastModified"),
    )


def find_s3_object(uri: str) -> S3Object | None:
    """Like `head_s3_object`, but None when the object does not exist."""
    try:
        return head_s3_object(uri)
    except S3ObjectNotFound:
        return None


def list_s3_pages(
    bucket: str, prefix: str, *, page_size: int = LIST_PAGE_SIZE, start_after: str | None = None
) -> Iterator[list[S3Object]]:
    """The objects under `prefix`, one listing page at a time, in key order.

    A page's last key is a resumable cursor: pass it back as `start_after`. Folder markers
    (empty keys ending in `/`) are left out.
    """
    paginator = s3_client().get_paginator("list_objects_v2")
    request = {"Bucket": bucket, "Prefix": prefix, "PaginationConfig": {"PageSize": page_size}}
    if start_after:
        request["StartAfter"] = start_after
    for response in paginator.paginate(**request):
        yield [
            S3Object(
                bucket=bucket,
                key=item["Key"],
                size=item["Size"],
                etag=normalise_etag(item["ETag"]),
                last_modified=item.get("LastModified"),
            )
            for item in response.get("Contents", [])
            if not (item["Key"].endswith("/") and item["Size"] == 0)
        ]


def list_s3_objects(uri: str, *, page_size: int = LIST_PAGE_SIZE) -> Iterator[S3Object]:
    """The object a URI names, or else every object under it read as a folder.

    `s3://b/report.pdf` yields that object; `s3://b/2024` yields `2024/...`; `s3://b` the bucket.
    """
    location = parse_s3_uri(uri)
    if location.key and not location.key.endswith("/"):
        single = find_s3_object(uri)
        if single is not None:
            yield single
            return
    found = False
    for page in list_s3_pages(location.bucket, location.as_prefix(), page_size=page_size):
        found = found or bool(page)
        yield from page
    if not found:
        raise S3ObjectNotFound(f"no object at or under {uri}")


def download_s3_object(obj: S3Object, dest_dir: Path, max_bytes: int) -> DownloadedObject:
    """Streams exactly the version `obj` describes into `dest_dir`, hashing as it goes.

    The request is pinned (VersionId, else If-Match on the ETag), so the bytes on disk are the
    bytes the listing or HEAD described; an overwrite in between raises `S3ObjectChanged`.
    """
    _check_size(obj.size, max_bytes, obj.uri)
    request = {"Bucket": obj.bucket, "Key": obj.key, "IfMatch": f'"{obj.etag}"'}
    if obj.version_id:
        request["VersionId"] = obj.version_id
    try:
        body = s3_client().get_object(**request)["Body"]
    except ClientError as exc:
        raise _translated(exc, obj.uri) from exc

    path = Path(dest_dir) / local_name(obj.key)
    digest = hashlib.sha256()
    size = 0
    try:
        with body, path.open("wb") as out:
            for chunk in body.iter_chunks(DOWNLOAD_CHUNK):
                size += len(chunk)
                _check_size(size, max_bytes, obj.uri)
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return DownloadedObject(path, digest.hexdigest(), size)


def local_name(key: str) -> str:
    """A fixed local file name keeping only a plain extension: the key never becomes a path."""
    suffix = PurePosixPath(key).suffix.lower()
    return "source" + (suffix if _PLAIN_SUFFIX.fullmatch(suffix) else "")


_PLAIN_SUFFIX = re.compile(r"\.[a-z0-9]{1,10}")


def _check_size(size: int, max_bytes: int, uri: str) -> None:
    if size > max_bytes:
        raise DocumentTooLarge(
            f"{uri} is over the limit of {max_bytes:,} bytes (OCRFLOW_MAX_FILE_BYTES)"
        )


def _translated(exc: ClientError, uri: str) -> Exception:
    """S3's answer as our error kinds: gone is permanent, changed is worth a retry."""
    code = exc.response.get("Error", {}).get("Code", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in {"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "404"} or status == 404:
        return S3ObjectNotFound(f"{uri}: {code or 'not found'}")
    if code == "PreconditionFailed" or status == 412:
        return S3ObjectChanged(f"{uri} changed while being fetched")
    return exc
