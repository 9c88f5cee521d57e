"""Faults on the S3 side: every event delivered three times out of order, a poison key in a
swept prefix, S3 throttling and 5xx answers from a fault proxy in front of S3, and a run killed
with SIGKILL while it holds a claim. Each ends with every live content version processed
exactly once: no page lost, no duplicate row, no version failed for a fault that was not its
own."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from flows.cli import app
from flows.s3_ingest import ingest_s3_objects
from infra.db.models import Document, Page, SourceObject, WatchedPrefix
from infra.db.session import session_scope
from infra.s3 import reset_clients, s3_client
from infra.settings import Settings
from services.event_intake import EventIntake, make_receiver
from tests.conftest import REPO_ROOT, SAMPLES_DIR, source_versions
from tests.test_s3_ingest import text_pdf
from tests.test_s3_intake import post

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def settings(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("OCRFLOW_DATABASE_URL", postgres_url)  # flows read their settings
    return Settings(database_url=postgres_url)


@dataclass
class Audit:
    pages_checked: int
    pages_lost: int
    duplicates: int


def audit(settings: Settings, bucket: str, live: dict[str, str]) -> Audit:
    """Checks the registry and the documents against what the bucket holds (`live`: key ->
    ETag). Lost: a live version not done, or a page of its document not done. Duplicates: a
    version registered twice, a content version with two documents, a page stored twice, a
    version processed more than once."""
    with session_scope(settings.database_url) as session:
        rows = session.scalars(select(SourceObject).where(SourceObject.bucket == bucket)).all()
        documents = session.execute(
            select(Document.key, Document.etag).where(Document.bucket == bucket)
        ).all()
        pages = session.execute(
            select(Page.document_id, Page.page_no, Page.status)
            .join(Document)
            .where(Document.bucket == bucket)
        ).all()
    current = {(r.key, r.etag): r for r in rows if r.deleted_at is None}
    done_pages = {(d, n) for d, n, status in pages if status == "done"}
    lost = checked = 0
    for key, etag in live.items():
        row = current.get((key, etag))
        if row is None or row.status != "done" or row.document_id is None:
            lost += 1
            continue
        numbers = [n for d, n, _ in pages if d == row.document_id]
        checked += len(numbers)
        lost += sum((row.document_id, n) not in done_pages for n in numbers) + (not numbers)
    stale = [r for r in rows if (r.key, r.etag) not in set(live.items())]
    lost += sum(r.deleted_at is None for r in stale)  # a version that left yet looks current
    duplicates = sum(n - 1 for n in Counter((r.key, r.etag) for r in rows).values())
    duplicates += sum(n - 1 for n in Counter(documents).values())
    duplicates += sum(n - 1 for n in Counter((d, n) for d, n, _ in pages).values())
    duplicates += sum(r.attempts - 1 for r in rows if r.status == "done" and r.attempts > 1)
    return Audit(checked, lost, duplicates)


def live_versions(bucket: str, prefix: str = "") -> dict[str, str]:
    listing = s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {item["Key"]: item["ETag"].strip('"') for item in listing}


# Every event three times, out of order -----------------------------------------------------


def event(bucket: str, key: str, name: str) -> bytes:
    from urllib.parse import quote_plus

    record = {
        "eventName": name,
        "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(key)}},
    }
    return json.dumps({"Records": [record]}).encode()


PHASES = [
    ["put k0 v1", "put k1 v1", "put k2 v1", "put k3 v1", "put k4 v1"],
    ["put k0 v2", "put k1 v2", "delete k2", "delete k3", "put k5 v1"],
    ["put k0 v3", "put k2 v2", "put k3 v1", "delete k4", "put k6 v1"],  # k3: its old bytes back
]


def test_events_delivered_three_times_out_of_order_register_and_process_each_version_once(
    settings: Settings, s3_bucket: str, fault_record
) -> None:
    """Three phases of uploads, overwrites, deletes and re-uploads (one with the very bytes it
    had before). Each event is delivered three times; a random part of what is due goes out
    after each phase, the rest later, all shuffled. Processing runs between phases too.
    Versions overwritten before any event was read are never seen, and need not be: events are
    hints, and the receiver registers what S3 holds when it asks."""
    rng = random.Random(7)
    bodies: dict[str, bytes] = {}  # "k3 v1" twice is the very same bytes twice

    def apply(step: str) -> bytes:
        """Does one step on S3; returns the event S3 would send for it."""
        operation, key, *version = step.split()
        if operation == "put":
            body = bodies.setdefault(f"{key} {version[0]}", text_pdf(f"{key} {version[0]}"))
            s3_client().put_object(Bucket=s3_bucket, Key=key, Body=body)
            return event(s3_bucket, key, "ObjectCreated:Put")
        s3_client().delete_object(Bucket=s3_bucket, Key=key)
        return event(s3_bucket, key, "ObjectRemoved:Delete")

    intake = EventIntake(settings, source="http")
    server = make_receiver(intake, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    due: list[bytes] = []
    answers: Counter[int] = Counter()
    processed: Counter[str] = Counter()
    try:
        for number, phase in enumerate(PHASES, start=1):
            for step in phase:
                due += [apply(step)] * 3
            rng.shuffle(due)
            now_count = len(due) if number == len(PHASES) else rng.randint(0, len(due))
            sending, due = due[:now_count], due[now_count:]
            for body in sending:
                answers[post(url, body)[0]] += 1
            processed.update(ingest_s3_objects(bucket=s3_bucket))
        processed.update(ingest_s3_objects(bucket=s3_bucket))
    finally:
        server.shutdown()
        server.server_close()

    deliveries = sum(len(phase) for phase in PHASES) * 3
    assert answers == {202: deliveries}
    live = live_versions(s3_bucket, "k")  # not our results under ocrflow-results/
    assert sorted(live) == ["k0", "k1", "k2", "k3", "k5", "k6"]
    versions = source_versions(settings, s3_bucket)
    assert {(v.key, v.etag) for v in versions if v.deleted_at is None} == set(live.items())
    assert all(v.status in ("done", "gone") for v in versions)
    assert all(v.attempts <= 1 for v in versions)
    result = audit(settings, s3_bucket, live)
    assert (result.pages_lost, result.duplicates) == (0, 0)
    assert result.pages_checked == len(live)
    assert set(processed) <= {"done", "gone"}  # nothing failed, nothing left for a retry
    fault_record(
        "s3-events-3x-out-of-order",
        fault="every S3 event delivered 3x, shuffled and late, through the HTTP receiver",
        injected=deliveries,
        pages_checked=result.pages_checked,
        pages_lost=result.pages_lost,
        duplicates=result.duplicates,
        versions_registered=len(versions),
    )


# A poison key in a swept prefix ------------------------------------------------------------

POISON = ["in/b\x00nul.pdf", "in/d\x1b[31m.pdf", "in/f" + "x" * 1100 + ".pdf"]


def test_a_poison_key_in_a_swept_prefix_is_skipped_and_the_cursor_moves_on(
    settings: Settings, s3_bucket: str, fault_record
) -> None:
    good = ["in/a.pdf", "in/c.pdf", "in/e.pdf", "in/g.pdf"]
    for key in good:
        s3_client().put_object(Bucket=s3_bucket, Key=key, Body=text_pdf(key))
    for key in POISON:
        s3_client().put_object(Bucket=s3_bucket, Key=key, Body=text_pdf("poison"))
    prefix = f"s3://{s3_bucket}/in/"
    runner = CliRunner()

    sweep_once = ["watch", "--once", "--no-process"]
    cursors, skipped = [], []
    for _ in range(10):  # register only, one page of two keys per run: the cursor must move
        cli = runner.invoke(app, [*sweep_once, prefix, "--page-size", "2", "--max-pages", "1"])
        assert cli.exit_code == 0, cli.output
        [swept] = json.loads(cli.stdout)["sweeps"]
        skipped += [entry["key"] for entry in swept["skipped_keys"]]
        with session_scope(settings.database_url) as session:
            cursors.append(session.scalars(select(WatchedPrefix.cursor)).one())
        if swept["complete"]:
            break
    cli = runner.invoke(app, ["watch", prefix, "--once"])

    assert cli.exit_code == 0, cli.output
    assert cursors[:-1] == sorted(set(cursors[:-1])) and cursors[-1] is None  # ever forward
    assert set(skipped) == set(POISON)
    live = {k: e for k, e in live_versions(s3_bucket).items() if k in good}
    result = audit(settings, s3_bucket, live)
    assert (result.pages_lost, result.duplicates, result.pages_checked) == (0, 0, len(good))
    assert sorted(v.key for v in source_versions(settings, s3_bucket)) == good
    fault_record(
        "s3-sweep-poison-key",
        fault="keys with NUL, an escape sequence and 1,100 bytes among documents in a prefix",
        injected=len(POISON),
        pages_checked=result.pages_checked,
        pages_lost=result.pages_lost,
        duplicates=result.duplicates,
        sweep_runs=len(cursors),
    )


# Throttling and 5xx from S3 ----------------------------------------------------------------


class FaultProxy:
    """S3 on loopback, forwarded to the real (moto) server, except that the first N requests of
    a kind ("list", "head", "get") are answered with an injected error instead."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.faults: dict[str, list[tuple[int, str]]] = {}
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def inject(self, kind: str, count: int, status: int, code: str) -> None:
        with self._lock:
            self.faults.setdefault(kind, []).extend([(status, code)] * count)

    def _take(self, kind: str) -> tuple[int, str] | None:
        with self._lock:
            if self.faults.get(kind):
                self.injected[kind] += 1
                return self.faults[kind].pop(0)
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _kind(self) -> str:
                path, _, query = self.path.partition("?")
                if self.command == "HEAD":
                    return "head"
                if self.command == "GET" and "list-type=2" in query:
                    return "list"
                if self.command == "GET" and path.strip("/").count("/") >= 1:
                    return "get"
                return "other"

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = b""
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        body += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return body
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                fault = proxy._take(self._kind())
                if fault is not None:
                    status, code = fault
                    error = f"<Error><Code>{code}</Code><Message>injected</Message></Error>"
                    payload = b"" if self.command == "HEAD" else error.encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=60
                )
                skip = {"host", "connection", "transfer-encoding", "content-length"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response_only(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in {"transfer-encoding", "connection", "content-length"}:
                        self.send_header(name, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


@pytest.fixture
def fault_proxy(s3_server: str) -> Iterator[FaultProxy]:
    """S3 (and SQS) through the fault proxy; botocore retries once by itself."""
    proxy = FaultProxy(s3_server)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", proxy.url)
        env.setenv("AWS_MAX_ATTEMPTS", "2")
        reset_clients()
        try:
            yield proxy
        finally:
            proxy.close()
    reset_clients()


def test_throttling_and_5xx_from_s3_leave_work_pending_and_every_object_done_once(
    settings: Settings, s3_bucket: str, fault_proxy: FaultProxy, fault_record
) -> None:
    keys = [f"load/{i}.pdf" for i in range(3)]
    for key in keys:
        s3_client().put_object(Bucket=s3_bucket, Key=key, Body=text_pdf(key))

    # The event receiver, while HEAD is throttled: 503 (retry later), then accepted.
    intake = EventIntake(settings, source="http")
    server = make_receiver(intake, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fault_proxy.inject("head", 2, 503, "SlowDown")  # both of botocore's attempts
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        first = post(url, event(s3_bucket, keys[0], "ObjectCreated:Put"))[0]
        again = post(url, event(s3_bucket, keys[0], "ObjectCreated:Put"))[0]
    finally:
        server.shutdown()
        server.server_close()
    assert (first, again, intake.counts.failed, intake.counts.rejected) == (503, 202, 1, 0)

    # The sweep and processing: listings throttled, HEADs and downloads answered 5xx.
    fault_proxy.inject("list", 3, 503, "SlowDown")  # one task retry, after botocore's own
    fault_proxy.inject("head", 2, 500, "InternalError")  # a claim's check: an outage
    fault_proxy.inject("get", 2, 503, "SlowDown")  # a download: the document left incomplete
    runs = []
    for _ in range(5):
        cli = CliRunner().invoke(app, ["watch", f"s3://{s3_bucket}/load/", "--once"])
        runs.append((cli.exit_code, json.loads(cli.stdout)["processed"][s3_bucket]))
        if cli.exit_code == 0:
            break

    assert runs[-1][0] == 0 and all(code == 1 for code, _ in runs[:-1])
    assert not any(outcomes.get("failed") for _, outcomes in runs)
    assert sum(outcomes.get("done", 0) for _, outcomes in runs) == len(keys)
    assert fault_proxy.injected == {"head": 4, "list": 3, "get": 2}
    versions = source_versions(settings, s3_bucket)
    assert [(v.status, v.attempts < settings.s3_max_attempts) for v in versions] == [
        ("done", True)
    ] * len(keys)
    live = live_versions(s3_bucket, "load/")
    result = audit(settings, s3_bucket, live)
    duplicates = result.duplicates - sum(v.attempts - 1 for v in versions)  # retries are fine
    assert (result.pages_lost, duplicates, result.pages_checked) == (0, 0, len(keys))
    fault_record(
        "s3-throttling-and-5xx",
        fault="503 SlowDown and 500 InternalError from a proxy in front of S3 "
        "(HEAD, listing, download), botocore retrying once",
        injected=sum(fault_proxy.injected.values()),
        pages_checked=result.pages_checked,
        pages_lost=result.pages_lost,
        duplicates=duplicates,
        watch_runs=len(runs),
    )


# A run killed while it holds a claim ---------------------------------------------------------


def test_a_sigkilled_run_releases_its_claim_within_one_lease_and_the_next_watch_resumes(
    settings: Settings,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    fault_record,
) -> None:
    from prefect.settings import PREFECT_API_URL

    lease = 3.0
    key = "scans/scan.pdf"
    s3_client().put_object(Bucket=s3_bucket, Key=key, Body=(SAMPLES_DIR / "scan.pdf").read_bytes())
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "OCRFLOW_S3_CLAIM_LEASE_SECONDS": str(lease),
        "OCRFLOW_ENGINE": "queue",  # no GPU worker: the scan waits, the run holds its claim
        "OCRFLOW_QUEUE_WORKER_GRACE_SECONDS": "600",
    }
    log = (tmp_path / "watch.log").open("w")
    run = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "watch", f"s3://{s3_bucket}/scans/", "--once"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not source_versions(settings, s3_bucket) or (
            source_versions(settings, s3_bucket)[0].status != "claimed"
        ):
            assert run.poll() is None and time.monotonic() < deadline, "never claimed"
            time.sleep(0.2)
        time.sleep(2 * lease)  # held well past one lease: the heartbeat renews it
        [held] = source_versions(settings, s3_bucket)
        assert held.status == "claimed" and held.attempts == 1
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        log.close()
    killed_at = time.monotonic()
    [orphan] = source_versions(settings, s3_bucket)  # its last renewal, and no more to come
    released_after = (
        orphan.claimed_at + timedelta(seconds=lease) - datetime.now(UTC)
    ).total_seconds() + (time.monotonic() - killed_at)
    assert released_after <= lease + 0.5  # free within one lease of the kill

    monkeypatch.setenv("OCRFLOW_S3_CLAIM_LEASE_SECONDS", str(lease))
    monkeypatch.setenv("OCRFLOW_ENGINE", "rapidocr")
    while True:  # the next watch, as often as a scheduler would start it
        cli = CliRunner().invoke(app, ["watch", f"s3://{s3_bucket}/scans/", "--once"])
        if json.loads(cli.stdout)["processed"][s3_bucket]:
            break
        assert time.monotonic() - killed_at < 60, "the claim was never released"
        time.sleep(0.5)
    resumed_after = time.monotonic() - killed_at

    assert cli.exit_code == 0, cli.output
    [version] = source_versions(settings, s3_bucket)
    assert (version.status, version.attempts) == ("done", 2)
    result = audit(settings, s3_bucket, live_versions(s3_bucket, "scans/"))
    duplicates = result.duplicates - (version.attempts - 1)  # the killed attempt is expected
    assert (result.pages_lost, duplicates) == (0, 0)
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Document)) == 1
    fault_record(
        "s3-claim-sigkill",
        fault="watch killed with SIGKILL while holding an S3 claim (lease 3 s)",
        injected=1,
        pages_checked=result.pages_checked,
        pages_lost=result.pages_lost,
        duplicates=duplicates,
        released_after_seconds=round(max(released_after, 0.0), 1),
        resumed_after_seconds=round(resumed_after, 1),
        lease_seconds=lease,
    )
