"""S3 and SQS clients, configured only by boto3's own chain.

Endpoint (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`), credentials (environment, profiles, SSO,
instance roles) and region all come from boto3, so MinIO or another S3-compatible store needs
no ocrflow setting. Clients are created on first use, never at import, and shared: boto3
clients are thread-safe once built, but building them from one session is not.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

import boto3
from botocore.config import Config

from infra.errors import PermanentInputError

CLIENT_CONFIG = Config(
    retries={"mode": "standard", "max_attempts": 5},
    max_pool_connections=32,  # concurrent downloads and sweeps share one client
)

_build_lock = threading.Lock()


@cache
def s3_client() -> Any:
    """The process-wide S3 client."""
    with _build_lock:
        return boto3.session.Session().client("s3", config=CLIENT_CONFIG)


@cache
def sqs_client() -> Any:
    """The process-wide SQS client (the event poller)."""
    with _build_lock:
        return boto3.session.Session().client("sqs", config=CLIENT_CONFIG)


def reset_clients() -> None:
    """Forget built clients, so the next use reads the configuration chain again (tests)."""
    s3_client.cache_clear()
    sqs_client.cache_clear()


S3_SCHEME = "s3://"
_BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-_]{1,254}")  # S3 rules, plus legacy ones


class InvalidS3Uri(PermanentInputError):
    """Not an `s3://bucket[/key]` URI."""


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key or key prefix, exactly as S3 spells them (no percent-decoding)."""

    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}"

    def as_prefix(self) -> str:
        """The key read as a folder: `docs` lists `docs/...`, never `docs2.pdf`."""
        return self.key if not self.key or self.key.endswith("/") else self.key + "/"


def parse_s3_uri(uri: str) -> S3Location:
    """Splits `s3://bucket/key` at the first slash; the key is kept verbatim.

    Keys may hold any character (`?`, `#`, `%`, spaces), so the URI is not URL-parsed.
    """
    if not uri.startswith(S3_SCHEME):
        raise InvalidS3Uri(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri.removeprefix(S3_SCHEME).partition("/")
    if not _BUCKET_NAME.fullmatch(bucket):
        raise InvalidS3Uri(f"invalid bucket name {bucket!r} in {uri!r}")
    return S3Location(bucket, key)


@dataclass(frozen=True)
class S3Object:
    """One version of an object, as a listing or HEAD reports it.

    `etag` is unquoted. `version_id` is None on unversioned buckets (S3 reports "null").
    """

    bucket: str
    key: str
    size: int
    etag: str
    version_id: str | None = None
    last_modified: datetime | None = None

    @property
    def uri(self) -> str:
        return S3Location(self.bucket, self.key).uri


def normalise_etag(etag: str) -> str:
    return etag.strip('"')


def normalise_version_id(version_id: str | None) -> str | None:
    return None if version_id in (None, "", "null") else version_id
