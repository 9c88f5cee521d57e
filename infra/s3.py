"""S3 and SQS clients, configured only by boto3's own chain.

Endpoint (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`), credentials (environment, profiles, SSO,
instance roles) and region all come from boto3, so MinIO or another S3-compatible store needs
no ocrflow setting. Clients are created on first use, never at import, and shared: boto3
clients are thread-safe once built, but building them from one session is not.
"""

from __future__ import annotations

import ipaddress
import os
import threading
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

import boto3
from botocore.config import Config

from infra.errors import PermanentInputError

DEFAULT_TOTAL_ATTEMPTS = 6  # a request and botocore's five retries (throttling, 5xx)

_build_lock = threading.Lock()


def client_config() -> Config:
    """Standard retries with backoff. `AWS_MAX_ATTEMPTS` (attempts in all, as boto3 reads it)
    overrides ours; it is read here because a Config's own setting would shadow it."""
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or DEFAULT_TOTAL_ATTEMPTS)
    return Config(
        retries={"mode": "standard", "total_max_attempts": attempts},
        max_pool_connections=32,  # concurrent downloads and sweeps share one client
    )


@cache
def s3_client() -> Any:
    """The process-wide S3 client."""
    with _build_lock:
        return boto3.session.Session().client("s3", config=client_config())


@cache
def sqs_client() -> Any:
    """The process-wide SQS client (the event poller)."""
    with _build_lock:
        return boto3.session.Session().client("sqs", config=client_config())


def reset_clients() -> None:
    """Forget built clients, so the next use reads the configuration chain again (tests)."""
    s3_client.cache_clear()
    sqs_client.cache_clear()


S3_SCHEME = "s3://"
MAX_KEY_BYTES = 1024  # S3's limit on an object key, in UTF-8 bytes
_BUCKET_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


class InvalidS3Uri(PermanentInputError):
    """Not an `s3://bucket[/key]` URI."""


class InvalidBucketName(InvalidS3Uri):
    """A name S3 cannot have given a bucket: an event or URI naming it is wrong, never late."""


class InvalidObjectKey(PermanentInputError):
    """A key we refuse to register: empty, too long, or with control characters (a NUL cannot
    even be stored in Postgres). Skipped and reported, never retried."""


def check_bucket_name(name: str) -> str:
    """`name` if S3 could have a bucket so named, else `InvalidBucketName` saying why.

    S3's rules (3-63 characters of `a-z 0-9 . -`, starting and ending with a letter or digit, no
    `..`, not an IP address), with the allowances of legacy us-east-1 buckets: upper case,
    underscores, up to 255 characters.
    """
    if not 3 <= len(name) <= 255:
        raise InvalidBucketName(f"bucket name {name!r} is not 3 to 255 characters long")
    if not set(name) <= _BUCKET_CHARACTERS:
        raise InvalidBucketName(f"bucket name {name!r} has characters other than a-z 0-9 . - _")
    if not (name[0].isalnum() and name[-1].isalnum()):
        raise InvalidBucketName(f"bucket name {name!r} must start and end with a letter or digit")
    if ".." in name:
        raise InvalidBucketName(f"bucket name {name!r} has two adjacent periods")
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return name
    raise InvalidBucketName(f"bucket name {name!r} is an IP address")


def check_object_key(key: str) -> str:
    """`key` if we can register and process it, else `InvalidObjectKey` saying why."""
    if not key:
        raise InvalidObjectKey("object key is empty")
    try:
        size = len(key.encode())
    except UnicodeEncodeError as exc:
        raise InvalidObjectKey(f"object key {key[:80]!r} is not valid UTF-8") from exc
    if size > MAX_KEY_BYTES:
        raise InvalidObjectKey(f"object key is {size:,} bytes, over S3's {MAX_KEY_BYTES:,}")
    for position, ch in enumerate(key):
        if unicodedata.category(ch) == "Cc":
            raise InvalidObjectKey(
                f"object key {key[:80]!r} has a control character U+{ord(ch):04X} at {position}"
            )
    return key


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
    try:
        check_bucket_name(bucket)
    except InvalidBucketName as exc:
        raise InvalidBucketName(f"{exc} (in {uri!r})") from exc
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
