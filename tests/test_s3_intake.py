"""Event intake end to end: real S3 notifications (moto S3 → SQS), the HTTP receiver, the
registry on Postgres, and Prefect events on a real Prefect server."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from urllib.error import HTTPError
from urllib.parse import quote_plus

import pytest
from sqlalchemy import select

from infra.db.models import SourceObject
from infra.db.session import session_scope
from infra.s3 import s3_client, sqs_client
from infra.settings import Settings
from services.event_intake import EventIntake, make_receiver, poll_sqs_once


@pytest.fixture
def settings(postgres_url: str) -> Settings:
    return Settings(database_url=postgres_url)


@pytest.fixture
def receiver(settings: Settings, prefect_server) -> Iterator[tuple[str, EventIntake]]:
    intake = EventIntake(settings, source="http")
    server = make_receiver(intake, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", intake
    server.shutdown()
    server.server_close()


def notification(bucket: str, *keys: str, event_name: str = "ObjectCreated:Put") -> bytes:
    records = [
        {"eventName": event_name, "s3": {"bucket": {"name": bucket}, "object": {"key": k}}}
        for k in (quote_plus(key, safe="") for key in keys)
    ]
    return json.dumps({"Records": records}).encode()


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except HTTPError as error:
        return error.code, json.load(error)


def registered_keys(settings: Settings, bucket: str) -> list[str]:
    with session_scope(settings.database_url) as session:
        return list(
            session.scalars(
                select(SourceObject.key)
                .where(SourceObject.bucket == bucket)
                .order_by(SourceObject.key)
            )
        )


def prefect_events(resource_prefix: str, expected: int, timeout: float = 30) -> list:
    """Events the Prefect server stored for resources under a prefix (delivery is async)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventResourceFilter

    query = EventFilter(resource=EventResourceFilter(id_prefix=[resource_prefix]))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            events = client.read_events(query, limit=50).events
            if len(events) >= expected or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


def test_http_receiver_registers_once_and_emits_prefect_events(receiver, settings, s3_bucket):
    url, intake = receiver
    keys = ["in/a report.pdf", "in/b+c.pdf"]
    for key in keys:
        s3_client().put_object(Bucket=s3_bucket, Key=key, Body=key.encode())

    for _ in range(3):  # the same notification, delivered three times
        assert post(url, notification(s3_bucket, *keys)) == (202, {"accepted": 2})
    assert post(url, notification(s3_bucket, keys[0], event_name="ObjectCreated:Copy"))[0] == 202

    assert registered_keys(settings, s3_bucket) == sorted(keys)
    assert (intake.counts.notifications, intake.counts.registered) == (4, 2)
    events = prefect_events(f"s3://{s3_bucket}/", expected=7)
    assert len(events) == 7
    assert {e.resource.id for e in events} == {f"s3://{s3_bucket}/{key}" for key in keys}
    assert {e.event for e in events} == {"ocrflow.s3.object.created"}


def test_malformed_events_are_rejected_counted_and_the_receiver_stays_up(receiver, s3_bucket):
    url, intake = receiver
    for body in (b"{not json", b"[]", b'{"Records": "x"}', b'{"Records": [{"s3": {}}]}'):
        status, reply = post(url, body)
        assert status == 400 and reply["error"]

    s3_client().put_object(Bucket=s3_bucket, Key="ok.pdf", Body=b"ok")
    assert post(url, notification(s3_bucket, "ok.pdf")) == (202, {"accepted": 1})
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        health = json.load(response)
    assert (health["rejected"], health["notifications"], health["registered"]) == (4, 1, 1)
    assert intake.counts.rejected == 4


def test_sqs_poller_reads_real_s3_notifications(settings, s3_bucket, prefect_server):
    sqs = sqs_client()
    queue_url = sqs.create_queue(QueueName=f"{s3_bucket}-events")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    s3_client().put_bucket_notification_configuration(
        Bucket=s3_bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {"QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}
            ]
        },
    )
    odd_key = "2024/Q1 scans/ré+port (1).pdf"
    s3_client().put_object(Bucket=s3_bucket, Key=odd_key, Body=b"pdf bytes")
    sqs.send_message(QueueUrl=queue_url, MessageBody="not a notification")

    intake = EventIntake(settings, source="sqs")
    while poll_sqs_once(intake, queue_url, wait_seconds=1):
        pass

    assert registered_keys(settings, s3_bucket) == [odd_key]
    assert (intake.counts.registered, intake.counts.rejected) == (1, 1)
    remaining = sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    assert set(remaining.values()) == {"0"}  # handled and malformed messages are both deleted
