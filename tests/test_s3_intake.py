"""Event intake end to end: real S3 notifications (moto S3 → SQS), the HTTP receiver, the
registry on Postgres, and Prefect events on a real Prefect server. Poison input (impossible
keys and buckets, lying or missing Content-Length, stalled bodies) is answered 4xx and never
blocks a queue; outages are answered 503 and left for redelivery."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from urllib.error import HTTPError
from urllib.parse import quote_plus, urlsplit

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from infra.db.models import SourceObject
from infra.db.session import session_scope
from infra.s3 import reset_clients, s3_client, sqs_client
from infra.settings import Settings
from services.event_intake import MAX_BODY_BYTES, EventIntake, make_receiver, poll_sqs_once


@pytest.fixture
def settings(postgres_url: str) -> Settings:
    return Settings(database_url=postgres_url)


READ_TIMEOUT = 2.0  # the receiver's patience with a stalled sender, short for the tests


def serve(intake: EventIntake) -> Iterator[str]:
    server = make_receiver(intake, "127.0.0.1", 0, read_timeout=READ_TIMEOUT)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def receiver(settings: Settings, prefect_server) -> Iterator[tuple[str, EventIntake]]:
    intake = EventIntake(settings, source="http")
    for url in serve(intake):
        yield url, intake


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


def raw_post(url: str, head: str, body: bytes = b"", *, half_close: bool = False) -> int:
    """Sends a hand-made request (any headers, any body) and returns the answered status;
    0 if the receiver closed the connection without one."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as connection:
        request = f"POST / HTTP/1.1\r\nHost: {parts.netloc}\r\n{head}\r\n".encode()
        try:
            connection.sendall(request + body)
            if half_close:
                connection.shutdown(socket.SHUT_WR)
        except OSError:  # refused mid-body: the answer may still be waiting
            pass
        answer = b""
        try:
            while chunk := connection.recv(65536):
                answer += chunk
        except OSError:
            pass
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def health(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        return json.load(response)


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
        assert post(url, notification(s3_bucket, *keys)) == (202, {"accepted": 2, "rejected": []})
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
    assert post(url, notification(s3_bucket, "ok.pdf")) == (202, {"accepted": 1, "rejected": []})
    counts = health(url)
    assert (counts["rejected"], counts["notifications"], counts["registered"]) == (4, 1, 1)
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


def test_a_key_with_a_nul_byte_is_refused_with_400_not_503(receiver, settings, s3_bucket):
    url, intake = receiver
    s3_client().put_object(Bucket=s3_bucket, Key="in/a\x00b.pdf", Body=b"poison")

    status, reply = post(url, notification(s3_bucket, "in/a\x00b.pdf"))

    assert status == 400  # once 503: the HEAD/insert blew up and the sender retried forever
    assert reply["accepted"] == 0 and "U+0000" in reply["rejected"][0]["error"]
    assert registered_keys(settings, s3_bucket) == []
    assert (intake.counts.rejected, intake.counts.failed) == (1, 0)


@pytest.mark.parametrize("bucket", ["no", "Bad..Name", "-dash", "10.0.0.1", "a b"])
def test_an_impossible_bucket_name_is_refused_with_400(receiver, bucket):
    url, intake = receiver
    status, reply = post(url, notification(bucket, "a.pdf"))
    assert status == 400 and "bucket name" in reply["rejected"][0]["error"]
    assert intake.counts.failed == 0


def test_valid_records_beside_bad_ones_are_registered_and_the_bad_ones_reported(
    receiver, settings, s3_bucket
):
    url, intake = receiver
    for key in ("in/one.pdf", "in/two.pdf"):
        s3_client().put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    body = json.loads(notification(s3_bucket, "in/one.pdf", "in/\x01ctl.pdf", "in/two.pdf"))
    body["Records"].append({"eventName": "ObjectCreated:Put", "s3": {}})

    status, reply = post(url, json.dumps(body).encode())

    assert status == 202
    assert reply["accepted"] == 2
    assert [r["index"] for r in reply["rejected"]] == [1, 3]
    assert "U+0001" in reply["rejected"][0]["error"]
    assert registered_keys(settings, s3_bucket) == ["in/one.pdf", "in/two.pdf"]
    assert (intake.counts.rejected, intake.counts.registered) == (2, 2)


def test_content_length_is_never_trusted(receiver, settings, s3_bucket):
    url, intake = receiver
    s3_client().put_object(Bucket=s3_bucket, Key="big.pdf", Body=b"x")
    valid = notification(s3_bucket, "big.pdf")
    huge = valid + b" " * (50 * 1024 * 1024)  # a 50 MB body that starts like a notification

    assert raw_post(url, f"Content-Length: {len(huge)}\r\n") == 413  # answered before the body
    assert raw_post(url, "Content-Length: -1\r\n", huge[: 2 * MAX_BODY_BYTES]) == 400
    assert raw_post(url, "Content-Length: abc\r\n", valid) == 400  # once: dropped unanswered
    assert raw_post(url, "Content-Length: 1e3\r\n", valid) == 400
    assert raw_post(url, f"Content-Length: 5\r\nContent-Length: {len(valid)}\r\n", valid) == 400
    assert raw_post(url, "", valid, half_close=True) == 411
    assert raw_post(url, "Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n") == 411
    # Lying small: only what was declared is read (not JSON once cut), the rest never is.
    assert raw_post(url, "Content-Length: 20\r\n", huge) in (400, 0)
    # Lying large, the sender closing early: answered, not waited on.
    assert raw_post(url, "Content-Length: 5000\r\n", valid, half_close=True) == 400

    assert registered_keys(settings, s3_bucket) == []
    assert intake.counts.notifications == 0
    assert post(url, valid) == (202, {"accepted": 1, "rejected": []})  # still serving


def test_a_stalled_body_is_timed_out_not_waited_on_forever(receiver, s3_bucket):
    url, _ = receiver
    started = time.monotonic()
    assert raw_post(url, "Content-Length: 1000\r\n", b'{"Records": [') == 408
    assert time.monotonic() - started < READ_TIMEOUT + 5


def test_an_empty_database_gets_its_schema_from_the_receiver(prefect_server, s3_bucket):
    from tests.conftest import _create_database, _drop_database

    name, url = _create_database()  # no migrations: as after `createdb`
    try:
        intake = EventIntake(Settings(database_url=url), source="http")
        s3_client().put_object(Bucket=s3_bucket, Key="first.pdf", Body=b"x")
        for receiver_url in serve(intake):
            assert post(receiver_url, notification(s3_bucket, "first.pdf"))[0] == 202
        assert registered_keys(Settings(database_url=url), s3_bucket) == ["first.pdf"]
    finally:
        from infra.db.session import get_engine

        get_engine(url).dispose()
        _drop_database(name)


class Remembered(logging.Handler):
    """The log lines of one logger, whatever handlers and propagation Prefect set up."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        self.logger = logging.getLogger(name)

    def __enter__(self) -> Remembered:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *_exc) -> None:
        self.logger.removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_sqs_command_on_an_empty_database_creates_the_schema_and_drops_poison(
    prefect_server, s3_bucket, monkeypatch
):
    from flows.cli import app
    from infra.db.session import get_engine
    from tests.conftest import _create_database, _drop_database

    sqs = sqs_client()
    queue_url = sqs.create_queue(QueueName=f"{s3_bucket}-cli")["QueueUrl"]
    s3_client().put_object(Bucket=s3_bucket, Key="ok.pdf", Body=b"x")
    sqs.send_message(QueueUrl=queue_url, MessageBody=notification(s3_bucket, "ok.pdf").decode())
    poison = notification(s3_bucket, "nul\x00.pdf", "ok.pdf").decode()
    sqs.send_message(QueueUrl=queue_url, MessageBody=poison)
    name, url = _create_database()
    monkeypatch.setenv("OCRFLOW_DATABASE_URL", url)
    try:
        with Remembered("ocrflow.events") as log:
            result = CliRunner().invoke(app, ["events", "sqs", queue_url, "--wait", "1", "--once"])
        assert result.exit_code == 0, result.output
        counts = json.loads(result.stdout)
        assert (counts["notifications"], counts["registered"], counts["rejected"]) == (2, 1, 1)
        assert registered_keys(Settings(database_url=url), s3_bucket) == ["ok.pdf"]
        [dropped] = log.lines
        assert "dropping record 0" in dropped and "U+0000" in dropped
        assert queue_depth(queue_url) == 0  # the poison message is deleted, not redelivered
    finally:
        get_engine(url).dispose()
        _drop_database(name)


def queue_depth(queue_url: str) -> int:
    attributes = sqs_client().get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return sum(int(value) for value in attributes.values())


def test_s3_unreachable_is_503_and_the_sqs_message_stays(receiver, settings, s3_bucket):
    url, intake = receiver
    sqs = sqs_client()
    queue_url = sqs.create_queue(QueueName=f"{s3_bucket}-outage")["QueueUrl"]
    sqs.send_message(QueueUrl=queue_url, MessageBody=notification(s3_bucket, "a.pdf").decode())
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL_S3", dead)  # S3 away, SQS still there
        env.setenv("AWS_MAX_ATTEMPTS", "1")
        reset_clients()
        status = post(url, notification(s3_bucket, "a.pdf"))[0]
        poller = EventIntake(settings, source="sqs")
        received = poll_sqs_once(poller, queue_url, wait_seconds=1)
    reset_clients()

    assert (status, received) == (503, 1)
    assert queue_depth(queue_url) == 1  # left for redelivery
    assert (intake.counts.failed, poller.counts.failed) == (1, 1)
    assert intake.counts.rejected == poller.counts.rejected == 0
