"""Parsing S3 notifications in every envelope: direct, SNS, EventBridge, MinIO; malformed ones."""

from __future__ import annotations

import json
from urllib.parse import quote, quote_plus

import pytest

from tasks.s3_events import ChangeKind, MalformedEvent, ObjectChange, parse_notification

ODD_KEY = "scans/2024 Q1/ré+port (1)%.pdf"


def s3_record(key: str, event_name: str = "ObjectCreated:Put", bucket: str = "archive") -> dict:
    """A record as S3 writes it: the key URL-encoded with spaces as `+`."""
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventName": event_name,
        "s3": {
            "bucket": {"name": bucket},
            "object": {
                "key": quote_plus(key, safe=""),
                "size": 1234,
                "eTag": "0123abcd",
                "versionId": "null",
                "sequencer": "0055AED6DCD90281E5",
            },
        },
    }


def test_direct_s3_notification_decodes_keys():
    changes = parse_notification(json.dumps({"Records": [s3_record(ODD_KEY)]}))
    assert changes == [
        ObjectChange(
            bucket="archive",
            key=ODD_KEY,
            kind=ChangeKind.CREATED,
            event_name="ObjectCreated:Put",
            etag="0123abcd",
            size=1234,
            version_id=None,
            sequencer="0055AED6DCD90281E5",
        )
    ]


def test_sns_envelope_is_unwrapped():
    inner = {"Records": [s3_record("a/b.pdf", "ObjectRemoved:Delete")]}
    body = {"Type": "Notification", "MessageId": "m-1", "Message": json.dumps(inner)}
    [change] = parse_notification(json.dumps(body))
    assert (change.key, change.kind) == ("a/b.pdf", ChangeKind.REMOVED)


def test_eventbridge_detail_uses_plain_url_encoding():
    body = {
        "version": "0",
        "detail-type": "Object Created",
        "source": "aws.s3",
        "detail": {
            "bucket": {"name": "archive"},
            "object": {"key": quote(ODD_KEY, safe="/"), "size": 5, "etag": "e1"},
        },
    }
    [change] = parse_notification(json.dumps(body))
    assert (change.key, change.kind, change.size) == (ODD_KEY, ChangeKind.CREATED, 5)


def test_minio_webhook_with_prefixed_event_names():
    body = {
        "EventName": "s3:ObjectCreated:Put",
        "Key": f"archive/{ODD_KEY}",
        "Records": [s3_record(ODD_KEY, "s3:ObjectCreated:Put")],
    }
    [change] = parse_notification(json.dumps(body).encode())
    assert (change.key, change.event_name) == (ODD_KEY, "ObjectCreated:Put")


def test_test_events_and_other_kinds_yield_no_changes():
    assert parse_notification('{"Service": "Amazon S3", "Event": "s3:TestEvent"}') == []
    restore = {"Records": [s3_record("a.pdf", "ObjectRestore:Completed")]}
    assert parse_notification(json.dumps(restore)) == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"hello": "world"}', "not an S3 notification"),
        ('{"Records": {"a": 1}}', "`Records` is not a list"),
        ('{"Records": [{"eventName": "ObjectCreated:Put"}]}', "`s3`"),
        ('{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {}}}]}', "`name`"),
        ('{"Type": "Notification", "Message": "oops"}', "not JSON"),
    ],
)
def test_malformed_notifications_raise_a_clear_error(body, reason):
    with pytest.raises(MalformedEvent, match=reason):
        parse_notification(body)
