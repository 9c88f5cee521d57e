"""S3 event notifications, in every envelope they arrive in, as a list of object changes.

Accepted shapes:
- S3's own `{"Records": [{"eventName": ..., "s3": {...}}]}` (direct to SQS or a webhook);
- the same inside an SNS notification (`{"Type": "Notification", "Message": "<json>"}`); SNS
  subscription confirmations are logged with their URL for a person to confirm;
- EventBridge (`{"source": "aws.s3", "detail-type": "Object Created", "detail": {...}}`);
- MinIO webhooks (`{"EventName": ..., "Key": "bucket/key", "Records": [...]}`).

Keys are URL-encoded in `Records` (space as `+`: decoded with `unquote_plus`) and in
EventBridge (space as `%20`, `+` literal: decoded with `unquote`). A body that is not a
notification raises `MalformedEvent`. Inside one, each record stands alone: a record that is
malformed or names an impossible bucket or key (empty, over 1,024 bytes, control characters
such as NUL) is rejected with its index and reason while the others are read, so one poison
record never holds back, or blocks forever, the valid ones beside it. S3's `s3:TestEvent` and
event kinds we do not act on (restores, tagging, replication) yield no changes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any
from urllib.parse import unquote, unquote_plus

from infra.errors import PermanentInputError
from infra.s3 import (
    S3Location,
    check_bucket_name,
    check_object_key,
    normalise_etag,
    normalise_version_id,
)

logger = logging.getLogger(__name__)

SNS_CONFIRMATIONS = {"SubscriptionConfirmation", "UnsubscribeConfirmation"}


class MalformedEvent(PermanentInputError):
    """Not an S3 event notification we can read; the message says what is wrong."""


class ChangeKind(StrEnum):
    CREATED = "created"
    REMOVED = "removed"


@dataclass(frozen=True)
class ObjectChange:
    """One object's change as an event reported it. Hints only: events arrive late, twice and
    out of order, so the handler asks S3 for the object's current state."""

    bucket: str
    key: str
    kind: ChangeKind
    event_name: str
    etag: str | None = None
    size: int | None = None
    version_id: str | None = None
    sequencer: str | None = None
    record_index: int = field(default=0, compare=False)  # its record's place in the notification

    @property
    def uri(self) -> str:
        return S3Location(self.bucket, self.key).uri


@dataclass(frozen=True)
class RejectedRecord:
    """One record of a notification we cannot use: its position and why."""

    index: int
    error: str


@dataclass(frozen=True)
class Notification:
    """What one notification body holds: changes to act on, records refused, records read."""

    changes: list[ObjectChange]
    rejected: list[RejectedRecord]
    records: int  # changes, rejected and ignored kinds (restores, tagging) together

    @property
    def all_rejected(self) -> bool:
        """Nothing in it was usable: the sender's mistake as a whole (HTTP 400)."""
        return bool(self.rejected) and len(self.rejected) == self.records


def parse_notification(body: str | bytes | dict[str, Any]) -> Notification:
    """The object changes in one notification body (an SQS message or an HTTP request)."""
    message = _json_object(body) if not isinstance(body, dict) else body
    if message.get("Type") in SNS_CONFIRMATIONS:
        # Confirming means fetching a URL from the request; we leave that to a person.
        logger.warning("SNS %s: confirm at %s", message["Type"], message.get("SubscribeURL"))
        return Notification([], [], 0)
    if message.get("Type") == "Notification" and "Message" in message:  # SNS envelope
        message = _json_object(message["Message"])
    if message.get("Event") == "s3:TestEvent":
        return Notification([], [], 0)
    if "Records" in message:
        records = message["Records"]
        if not isinstance(records, list):
            raise MalformedEvent("`Records` is not a list")
        return _read_each(records, _from_record)
    if message.get("source") == "aws.s3" and "detail" in message:
        return _read_each([message], _from_eventbridge)
    raise MalformedEvent(
        "not an S3 notification: no `Records`, SNS `Message` or EventBridge `detail`"
    )


def _read_each(records: list[Any], read: Callable[[Any], ObjectChange | None]) -> Notification:
    changes: list[ObjectChange] = []
    rejected: list[RejectedRecord] = []
    for index, record in enumerate(records):
        try:
            change = read(record)
        except PermanentInputError as exc:
            rejected.append(RejectedRecord(index, str(exc)))
            continue
        if change is not None:
            changes.append(replace(change, record_index=index))
    return Notification(changes, rejected, len(records))


def _json_object(text: str | bytes) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, TypeError) as exc:
        raise MalformedEvent(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise MalformedEvent(f"expected a JSON object, got {type(value).__name__}")
    return value


def _from_record(record: Any) -> ObjectChange | None:
    if not isinstance(record, dict):
        raise MalformedEvent("a record is not a JSON object")
    event_name = _required(record, "eventName", str).removeprefix("s3:")
    kind = _kind_of_record(event_name)
    if kind is None:
        return None
    s3 = _required(record, "s3", dict)
    bucket = check_bucket_name(_required(_required(s3, "bucket", dict), "name", str))
    obj = _required(s3, "object", dict)
    return ObjectChange(
        bucket=bucket,
        key=_key(unquote_plus, _required(obj, "key", str)),
        kind=kind,
        event_name=event_name,
        etag=_etag(obj.get("eTag")),
        size=_size(obj.get("size")),
        version_id=normalise_version_id(obj.get("versionId")),
        sequencer=obj.get("sequencer"),
    )


def _kind_of_record(event_name: str) -> ChangeKind | None:
    if event_name.startswith("ObjectCreated:"):
        return ChangeKind.CREATED
    if event_name.startswith(("ObjectRemoved:", "LifecycleExpiration:")):
        return ChangeKind.REMOVED
    return None


_EVENTBRIDGE_KINDS = {"Object Created": ChangeKind.CREATED, "Object Deleted": ChangeKind.REMOVED}


def _from_eventbridge(message: Any) -> ObjectChange | None:
    detail_type = _required(message, "detail-type", str)
    kind = _EVENTBRIDGE_KINDS.get(detail_type)
    if kind is None:
        return None
    detail = _required(message, "detail", dict)
    obj = _required(detail, "object", dict)
    return ObjectChange(
        bucket=check_bucket_name(_required(_required(detail, "bucket", dict), "name", str)),
        key=_key(unquote, _required(obj, "key", str)),
        kind=kind,
        event_name=detail_type,
        etag=_etag(obj.get("etag")),
        size=_size(obj.get("size")),
        version_id=normalise_version_id(obj.get("version-id")),
        sequencer=obj.get("sequencer"),
    )


def _required(container: dict[str, Any], name: str, kind: type) -> Any:
    value = container.get(name)
    if not isinstance(value, kind) or (kind is str and not value):
        raise MalformedEvent(f"missing or invalid `{name}`")
    return value


def _key(decode: Callable[..., str], encoded: str) -> str:
    """The decoded key, refused when it is not UTF-8 or not a key we can register."""
    try:
        key = decode(encoded, errors="strict")
    except UnicodeDecodeError as exc:
        raise MalformedEvent(f"object key {encoded[:80]!r} does not decode as UTF-8") from exc
    return check_object_key(key)


def _etag(value: Any) -> str | None:
    return normalise_etag(value) if isinstance(value, str) and value else None


def _size(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError) as exc:
        raise MalformedEvent(f"invalid object size {value!r}") from exc
