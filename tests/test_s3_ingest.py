"""S3 ingestion end to end on a real S3 API (moto over HTTP), Postgres and a Prefect server:
events and sweeps register, `ingest-s3-objects` processes each content version once, results
land under the results prefix. Documents are born-digital text PDFs (the text-layer route),
or a scan sent to the GPU queue with no worker (left incomplete) where a slow, retried
document is needed. `watch --once` exits 0 only when everything it processed ended done."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pymupdf
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from flows.cli import app
from flows.s3_ingest import ingest_s3_objects
from flows.watch import watch
from infra.db.models import Document, SourceObject
from infra.db.registry import claim_next
from infra.db.session import session_scope
from infra.s3 import reset_clients, s3_client
from infra.settings import Settings
from services.event_intake import EventIntake
from tests.conftest import SAMPLES_DIR, source_versions
from tests.test_s3_intake import prefect_events


@pytest.fixture
def settings(postgres_url: str, prefect_server, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("OCRFLOW_DATABASE_URL", postgres_url)  # flows read their settings
    return Settings(database_url=postgres_url)


def text_pdf(title: str) -> bytes:
    document = pymupdf.open()
    page = document.new_page()
    lines = [
        title,
        *(f"Line {i} of the {title} archive record, typed for testing." for i in range(12)),
    ]
    page.insert_text((72, 72), "\n".join(lines), fontsize=11)
    return document.tobytes()


def upload(bucket: str, key: str, title: str) -> None:
    s3_client().put_object(Bucket=bucket, Key=key, Body=text_pdf(title))


def event(bucket: str, key: str, name: str = "ObjectCreated:Put") -> str:
    from urllib.parse import quote_plus

    record = {
        "eventName": name,
        "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(key)}},
    }
    return json.dumps({"Records": [record]})


def documents_of(settings: Settings, bucket: str) -> int:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(func.count()).where(Document.bucket == bucket))


def read_text(bucket: str, key: str) -> str:
    return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def result_keys(bucket: str) -> set[str]:
    listing = s3_client().list_objects_v2(Bucket=bucket, Prefix="ocrflow-results/")
    return {item["Key"] for item in listing.get("Contents", [])}


def test_events_repeated_and_out_of_order_process_each_upload_once(settings, s3_bucket):
    keys = ["in/../../etc/report.pdf", "in/ré port+(1).pdf"]
    for key in keys:
        upload(s3_bucket, key, title=key)
    intake = EventIntake(settings, source="test")
    for key in keys:
        intake.accept(event(s3_bucket, key, "ObjectRemoved:Delete"))  # stale, out of order
        for _ in range(3):
            intake.accept(event(s3_bucket, key))

    assert ingest_s3_objects(bucket=s3_bucket) == {"done": 2}
    assert ingest_s3_objects(bucket=s3_bucket) == {}  # nothing left: no second processing
    intake.accept(event(s3_bucket, keys[0]))  # a very late duplicate
    assert ingest_s3_objects(bucket=s3_bucket) == {}

    versions = source_versions(settings, s3_bucket)
    assert [(v.status, v.attempts, v.deleted_at) for v in versions] == [("done", 1, None)] * 2
    assert documents_of(settings, s3_bucket) == 2
    written = result_keys(s3_bucket)
    assert all(key.startswith(f"ocrflow-results/{s3_bucket}/in/") for key in written)
    report = next(k for k in written if "etc" in k and k.endswith("document.md"))
    assert "Line 3 of the in/../../etc/report.pdf archive record" in read_text(s3_bucket, report)
    pages = json.loads(read_text(s3_bucket, report.replace("document.md", "document.json")))
    assert pages["pages"][0]["number"] == 1 and pages["pages"][0]["markdown"]


def test_sweep_catches_lost_events_changes_and_deletions(settings, s3_bucket):
    prefix = f"s3://{s3_bucket}/inbox/"
    upload(s3_bucket, "inbox/a.pdf", "first edition")  # its event was lost
    cli = CliRunner().invoke(app, ["watch", prefix, "--once"])
    assert cli.exit_code == 0, cli.output
    first = json.loads(cli.stdout.strip().splitlines()[-1])
    assert first["sweeps"][0]["registered"] == 1
    assert first["processed"] == {s3_bucket: {"done": 1}}

    upload(s3_bucket, "inbox/a.pdf", "second edition")  # changed: a new version
    assert watch([prefix])["processed"] == {s3_bucket: {"done": 1}}
    old, new = source_versions(settings, s3_bucket)
    assert (old.status, old.deleted_at is not None) == ("done", True)
    assert (new.status, new.deleted_at) == ("done", None)
    assert old.document_id != new.document_id

    s3_client().delete_object(Bucket=s3_bucket, Key="inbox/a.pdf")
    gone = watch([prefix])
    assert (gone["sweeps"][0]["deleted"], gone["processed"]) == (1, {s3_bucket: {}})
    assert all(v.deleted_at is not None for v in source_versions(settings, s3_bucket))
    assert documents_of(settings, s3_bucket) == 2  # results kept
    assert any(k.endswith("inbox/a.pdf/document.md") for k in result_keys(s3_bucket))


def test_concurrent_runs_process_each_version_once(settings, s3_bucket):
    for i in range(4):
        upload(s3_bucket, f"batch/{i}.pdf", f"document number {i}")
    registered_only = watch([f"s3://{s3_bucket}/batch/"], process=False)
    assert registered_only["processed"] == {}
    [announced] = prefect_events(f"s3://{s3_bucket}/batch/", expected=1)
    assert (announced.event, announced.payload["registered"]) == ("ocrflow.s3.sweep.registered", 4)

    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda _: ingest_s3_objects(bucket=s3_bucket), range(2)))
    assert sum(report.get("done", 0) for report in reports) == 4
    assert all(v.status == "done" and v.attempts == 1 for v in source_versions(settings, s3_bucket))
    assert documents_of(settings, s3_bucket) == 4


def test_cli_ingest_of_an_s3_prefix_processes_and_writes_results_back(
    settings: Settings, s3_bucket: str
) -> None:
    upload(s3_bucket, "archive/a.pdf", "Alpha")
    upload(s3_bucket, "archive/sub/b.pdf", "Beta")
    upload(s3_bucket, "elsewhere/c.pdf", "Gamma")

    result = CliRunner().invoke(app, ["ingest", f"s3://{s3_bucket}/archive/", "--json"])

    assert result.exit_code == 0, result.output
    outcomes = json.loads(result.stdout)
    assert sorted(o["source"] for o in outcomes) == [
        f"s3://{s3_bucket}/archive/a.pdf",
        f"s3://{s3_bucket}/archive/sub/b.pdf",
    ]
    assert {o["status"] for o in outcomes} == {"done"}
    keys = [
        obj["Key"]
        for obj in s3_client().list_objects_v2(Bucket=s3_bucket).get("Contents", [])
        if obj["Key"].startswith(settings.results_prefix)
    ]
    assert any(k.endswith("a.pdf/document.md") for k in keys), keys
    assert any(k.endswith("b.pdf/document.json") for k in keys), keys
    with session_scope(settings.database_url) as session:
        stored = session.scalars(select(Document).order_by(Document.key)).all()
        assert [(d.bucket, d.key) for d in stored] == [
            (s3_bucket, "archive/a.pdf"),
            (s3_bucket, "archive/sub/b.pdf"),
        ]
        assert all(d.etag and d.sha256 for d in stored)


def test_document_pinned_to_a_registered_version_refuses_newer_content(
    settings: Settings, s3_bucket: str
) -> None:
    from flows.ingest import ingest_document

    upload(s3_bucket, "pinned.pdf", "First")
    registered = s3_client().head_object(Bucket=s3_bucket, Key="pinned.pdf")["ETag"].strip('"')
    upload(s3_bucket, "pinned.pdf", "Second")  # overwritten after registration

    outcome = ingest_document(f"s3://{s3_bucket}/pinned.pdf", etag=registered)
    assert outcome.status not in ("done", "skipped")
    assert "SourceChanged" in outcome.error and "changed since it was registered" in outcome.error
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Document)) == 0


def watch_once(*arguments: str) -> tuple[int, dict]:
    """`ocrflow watch --once`: its exit code and the one JSON document it printed."""
    cli = CliRunner().invoke(app, ["watch", *arguments, "--once"])
    return cli.exit_code, json.loads(cli.stdout)


def test_watch_once_exits_1_when_an_object_fails_and_prints_the_json_either_way(
    settings, s3_bucket
):
    prefix = f"s3://{s3_bucket}/mixed/"
    upload(s3_bucket, "mixed/good.pdf", "a good one")
    s3_client().put_object(Bucket=s3_bucket, Key="mixed/bad.pdf", Body=b"%PDF-1.7 truncated")

    code, result = watch_once(prefix)

    assert code == 1
    assert result["processed"] == {s3_bucket: {"done": 1, "failed": 1}}
    again_code, again = watch_once(prefix)  # nothing left to process: the failure is recorded
    assert (again_code, again["processed"]) == (0, {s3_bucket: {}})


def test_watch_once_skips_a_poison_key_registers_the_rest_and_exits_0(settings, s3_bucket):
    prefix = f"s3://{s3_bucket}/drop/"
    poison = "drop/b\x00\x1b[31m.pdf"
    upload(s3_bucket, "drop/a.pdf", "before the poison")
    s3_client().put_object(Bucket=s3_bucket, Key=poison, Body=text_pdf("poison"))
    upload(s3_bucket, "drop/c.pdf", "after the poison")

    code, result = watch_once(prefix, "--page-size", "2")  # once: exit 1, cursor never saved

    assert code == 0
    [swept] = result["sweeps"]
    assert (swept["registered"], swept["skipped"], swept["complete"]) == (2, 1, True)
    assert swept["skipped_keys"][0]["key"] == poison
    assert "U+0000" in swept["skipped_keys"][0]["error"]
    assert result["processed"] == {s3_bucket: {"done": 2}}
    assert [v.key for v in source_versions(settings, s3_bucket)] == ["drop/a.pdf", "drop/c.pdf"]


@pytest.fixture
def no_gpu_worker(settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """OCR goes to the GPU queue and nobody serves it: a scan is left incomplete in ~3 s."""
    monkeypatch.setenv("OCRFLOW_ENGINE", "queue")
    monkeypatch.setenv("OCRFLOW_QUEUE_WORKER_GRACE_SECONDS", "3")
    monkeypatch.setenv("OCRFLOW_S3_MAX_ATTEMPTS", "2")
    return Settings(database_url=settings.database_url)


def test_an_incomplete_document_is_retried_then_fails_when_its_attempts_run_out(
    no_gpu_worker, s3_bucket
):
    prefix = f"s3://{s3_bucket}/scans/"
    s3_client().put_object(
        Bucket=s3_bucket, Key="scans/scan.pdf", Body=(SAMPLES_DIR / "scan.pdf").read_bytes()
    )

    first_code, first = watch_once(prefix)
    [version] = source_versions(no_gpu_worker, s3_bucket)
    assert (first_code, first["processed"]) == (1, {s3_bucket: {"retried": 1}})
    assert (version.status, version.attempts) == ("pending", 1)
    assert "unfinished" in version.error

    last_code, last = watch_once(prefix)
    [version] = source_versions(no_gpu_worker, s3_bucket)
    assert (last_code, last["processed"]) == (1, {s3_bucket: {"failed": 1}})
    assert (version.status, version.attempts) == ("failed", 2)
    assert "unfinished" in version.error


def test_a_long_document_keeps_its_claim_while_its_lease_is_renewed(
    no_gpu_worker, s3_bucket, monkeypatch
):
    monkeypatch.setenv("OCRFLOW_S3_CLAIM_LEASE_SECONDS", "1.2")  # the scan takes ~3 s
    s3_client().put_object(
        Bucket=s3_bucket, Key="slow.pdf", Body=(SAMPLES_DIR / "scan.pdf").read_bytes()
    )
    watch([f"s3://{s3_bucket}/"], process=False)
    run = threading.Thread(target=ingest_s3_objects, kwargs={"bucket": s3_bucket})
    run.start()
    while run.is_alive() and source_versions(no_gpu_worker, s3_bucket)[0].status != "claimed":
        time.sleep(0.05)
    taken_over = []
    while run.is_alive():  # a second run tries all along, with the same lease
        with session_scope(no_gpu_worker.database_url) as session:
            held = session.scalar(  # locked: the first run cannot settle it meanwhile
                select(SourceObject.status)
                .where(SourceObject.bucket == s3_bucket)
                .with_for_update()
            )
            if held != "claimed":  # settled (back to pending): claiming it now is fair
                break
            intruder = claim_next(
                session=session,
                worker="second-run",
                lease=timedelta(seconds=1.2),
                max_attempts=2,
                bucket=s3_bucket,
            )
            if intruder is not None:
                taken_over.append(intruder)
            session.rollback()
        time.sleep(0.1)
    run.join()

    [version] = source_versions(no_gpu_worker, s3_bucket)
    assert taken_over == []  # once the lease ran out mid-document, a second run took it
    assert (version.status, version.attempts, version.claimed_by != "second-run") == (
        "pending",
        1,
        True,
    )


def test_s3_away_leaves_versions_pending_with_their_attempts_and_stops_the_run(settings, s3_bucket):
    for i in range(5):
        upload(s3_bucket, f"away/{i}.pdf", f"document {i}")
    watch([f"s3://{s3_bucket}/away/"], process=False)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL_S3", dead)
        env.setenv("AWS_MAX_ATTEMPTS", "1")
        reset_clients()
        report = ingest_s3_objects(bucket=s3_bucket)
    reset_clients()

    assert report == {"retried": 3}  # three outages in a row: the run gives up, not the versions
    versions = source_versions(settings, s3_bucket)
    assert [(v.status, v.attempts) for v in versions] == [("pending", 0)] * 5
    assert all("EndpointConnectionError" in v.error for v in versions[:3])
