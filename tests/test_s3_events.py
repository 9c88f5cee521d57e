"""Parsing S3 notifications in every envelope: direct, SNS, EventBridge, MinIO; malformed ones,
and poison records (impossible keys and buckets) refused one by one beside valid ones."""

from __future__ import annotations

import json
from urllib.parse import quote, quote_plus

import pytest

from infra.s3 import InvalidBucketName, InvalidObjectKey, check_bucket_name, check_object_key
from tasks.s3_events import (
    ChangeKind,
    MalformedEvent,
    ObjectChange,
    RejectedRecord,
    parse_notification,
)

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
    changes = parse_notification(json.dumps({"Records": [s3_record(ODD_KEY)]})).changes
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
    [change] = parse_notification(json.dumps(body)).changes
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
    [change] = parse_notification(json.dumps(body)).changes
    assert (change.key, change.kind, change.size) == (ODD_KEY, ChangeKind.CREATED, 5)


def test_minio_webhook_with_prefixed_event_names():
    body = {
        "EventName": "s3:ObjectCreated:Put",
        "Key": f"archive/{ODD_KEY}",
        "Records": [s3_record(ODD_KEY, "s3:ObjectCreated:Put")],
    }
    [change] = parse_notification(json.dumps(body).encode()).changes
    assert (change.key, change.event_name) == (ODD_KEY, "ObjectCreated:Put")


def test_test_events_and_other_kinds_yield_no_changes():
    test_event = parse_notification('{"Service": "Amazon S3", "Event": "s3:TestEvent"}')
    assert (test_event.changes, test_event.rejected) == ([], [])
    restore = parse_notification(
        json.dumps({"Records": [s3_record("a.pdf", "ObjectRestore:Completed")]})
    )
    assert (restore.changes, restore.rejected, restore.all_rejected) == ([], [], False)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"hello": "world"}', "not an S3 notification"),
        ('{"Records": {"a": 1}}', "`Records` is not a list"),
        ('{"Type": "Notification", "Message": "oops"}', "not JSON"),
    ],
)
def test_malformed_notifications_raise_a_clear_error(body, reason):
    with pytest.raises(MalformedEvent, match=reason):
        parse_notification(body)


def test_each_bad_record_is_rejected_with_its_index_and_the_valid_ones_are_read():
    records = [
        s3_record("in/ok 1.pdf"),
        {"eventName": "ObjectCreated:Put"},  # no `s3`
        {**s3_record("x"), "s3": {"bucket": {}, "object": {"key": "x"}}},  # no bucket name
        s3_record("in/nul\x00byte.pdf"),  # %00 once decoded: Postgres cannot store it
        s3_record("in/line\r\nbreak.pdf"),
        s3_record(""),
        s3_record("k" * 1025),
        s3_record("a.pdf", bucket="Bad..bucket"),
        "not a record",
        {**s3_record("x"), "s3": {"bucket": {"name": "archive"}, "object": {"key": "%ff.pdf"}}},
        s3_record("in/ok 2.pdf", "ObjectRemoved:Delete"),
    ]
    notification = parse_notification(json.dumps({"Records": records}))

    assert [(c.key, c.kind) for c in notification.changes] == [
        ("in/ok 1.pdf", ChangeKind.CREATED),
        ("in/ok 2.pdf", ChangeKind.REMOVED),
    ]
    assert [c.record_index for c in notification.changes] == [0, 10]
    reasons = {r.index: r.error for r in notification.rejected}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert "`s3`" in reasons[1] and "`name`" in reasons[2]
    assert "U+0000" in reasons[3] and "U+000D" in reasons[4]
    assert "`key`" in reasons[5]  # an empty key is a missing key
    assert "1,025 bytes" in reasons[6]
    assert "adjacent periods" in reasons[7]
    assert "not a JSON object" in reasons[8]
    assert "UTF-8" in reasons[9]
    assert not notification.all_rejected


def test_a_notification_of_only_bad_records_is_all_rejected():
    body = {"Records": [s3_record("a\x00.pdf"), s3_record("b.pdf", bucket="no")]}
    notification = parse_notification(json.dumps(body))
    assert notification.changes == []
    assert [r.index for r in notification.rejected] == [0, 1]
    assert notification.all_rejected
    assert isinstance(notification.rejected[0], RejectedRecord)


def test_eventbridge_with_a_poison_key_is_rejected_not_raised():
    body = {
        "source": "aws.s3",
        "detail-type": "Object Created",
        "detail": {"bucket": {"name": "archive"}, "object": {"key": "a%00b.pdf"}},
    }
    notification = parse_notification(json.dumps(body))
    assert notification.all_rejected and "U+0000" in notification.rejected[0].error


@pytest.mark.parametrize(
    "name",
    [
        "",
        "ab",
        "-archive",
        "archive-",
        "arch..ive",
        "192.168.0.1",
        "a b",
        "a/b",
        "é-bucket",
        "x" * 256,
    ],
)
def test_impossible_bucket_names_are_refused(name):
    with pytest.raises(InvalidBucketName):
        check_bucket_name(name)


@pytest.mark.parametrize("name", ["archive", "my.bucket-2024", "Legacy_Bucket", "abc", "x" * 63])
def test_real_bucket_names_are_kept(name):
    assert check_bucket_name(name) == name


@pytest.mark.parametrize(
    "key", ["", "a\x00b", "tab\tkey", "del\x7f", "c1\x85", "x" * 1025, "é" * 513, "\ud800"]
)
def test_impossible_keys_are_refused(key):
    with pytest.raises(InvalidObjectKey):
        check_object_key(key)


@pytest.mark.parametrize("key", [ODD_KEY, "x" * 1024, "é" * 512, "a/../b", " leading space"])
def test_awkward_but_real_keys_are_kept(key):
    assert check_object_key(key) == key
