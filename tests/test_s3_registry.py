"""The S3 registry against a real S3 API (moto over HTTP) on Postgres and SQLite: duplicate,
late and out-of-order events, changed and deleted objects, concurrent claims and sweeps,
resumable paginated backfills, claims that expire until they fail, renewed leases, and poison
keys that a sweep skips while its cursor moves on."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import select

from infra.db.models import WatchedPrefix
from infra.db.registry import claim_next, finish_claim, renew_claim, status_counts
from infra.db.session import session_scope
from infra.s3 import S3Location, S3Object, s3_client
from infra.settings import Settings
from tasks.s3_reconcile import reconcile_keys, register_each, sweep_prefix, usable_objects
from tests.conftest import source_versions


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url)


def put(bucket: str, key: str, body: bytes) -> None:
    s3_client().put_object(Bucket=bucket, Key=key, Body=body)


def counts(settings: Settings, bucket: str) -> dict[str, int]:
    with session_scope(settings.database_url) as session:
        return status_counts(session=session, bucket=bucket)


def claim_all(settings: Settings, bucket: str, worker: str) -> list[int]:
    claimed = []
    while True:
        with session_scope(settings.database_url) as session:
            claim = claim_next(
                session=session,
                worker=worker,
                lease=timedelta(hours=1),
                max_attempts=3,
                bucket=bucket,
            )
            if claim is None:
                return claimed
            finish_claim(session=session, claim=claim, status="done")
        claimed.append(claim.id)


def test_repeated_and_late_events_register_one_version(settings, s3_bucket):
    put(s3_bucket, "in/a.pdf", b"first")
    key = S3Location(s3_bucket, "in/a.pdf")
    for _ in range(3):
        reconcile_keys([key], settings)
    assert [(v.key, v.status) for v in source_versions(settings, s3_bucket)] == [
        ("in/a.pdf", "pending")
    ]

    # A late "created" for a version that was overwritten since registers only the current one.
    put(s3_bucket, "in/a.pdf", b"second")
    reconcile_keys([key, key], settings)
    first, second = source_versions(settings, s3_bucket)
    assert (first.deleted_at is not None, first.status) == (True, "gone")
    assert (second.deleted_at, second.status) == (None, "pending")
    assert first.etag != second.etag


def test_removed_then_late_created_event_leaves_the_object_deleted(settings, s3_bucket):
    put(s3_bucket, "doc.pdf", b"bytes")
    key = S3Location(s3_bucket, "doc.pdf")
    reconcile_keys([key], settings)
    assert claim_all(settings, s3_bucket, "w") != []  # processed before the delete

    s3_client().delete_object(Bucket=s3_bucket, Key="doc.pdf")
    reconcile_keys([key], settings)  # the "removed" event
    reconcile_keys([key], settings)  # a late duplicate of the "created" event
    [version] = source_versions(settings, s3_bucket)
    assert version.deleted_at is not None
    assert version.status == "done"  # its results are kept


def test_concurrent_workers_claim_each_version_once(settings, s3_bucket):
    for i in range(24):
        put(s3_bucket, f"batch/{i:02d}.pdf", f"doc {i}".encode())
    sweep_prefix(f"s3://{s3_bucket}/batch/", settings)

    with ThreadPoolExecutor(4) as pool:
        claims = list(pool.map(lambda w: claim_all(settings, s3_bucket, w), ["a", "b", "c", "d"]))
    claimed = [object_id for worker_claims in claims for object_id in worker_claims]
    assert len(claimed) == len(set(claimed)) == 24
    assert all(v.attempts == 1 and v.status == "done" for v in source_versions(settings, s3_bucket))


def test_expired_lease_is_retaken_and_the_stale_worker_cannot_finish(settings, s3_bucket):
    put(s3_bucket, "slow.pdf", b"bytes")
    reconcile_keys([S3Location(s3_bucket, "slow.pdf")], settings)
    with session_scope(settings.database_url) as session:
        stale = claim_next(
            session=session,
            worker="dead",
            lease=timedelta(hours=1),
            max_attempts=3,
            bucket=s3_bucket,
        )
    with session_scope(settings.database_url) as session:
        kept = claim_next(
            session=session,
            worker="live",
            lease=timedelta(hours=1),
            max_attempts=3,
            bucket=s3_bucket,
        )
    assert stale is not None and kept is None  # a live lease is respected
    with session_scope(settings.database_url) as session:
        retaken = claim_next(
            session=session, worker="live", lease=timedelta(0), max_attempts=3, bucket=s3_bucket
        )
        assert retaken is not None and retaken.attempt == 2
        assert not finish_claim(session=session, claim=stale, status="done")
        assert finish_claim(session=session, claim=retaken, status="done")


def test_concurrent_sweeps_register_each_version_once(settings, s3_bucket):
    for i in range(30):
        put(s3_bucket, f"p/{i:02d}.pdf", f"doc {i}".encode())
    uri = f"s3://{s3_bucket}/p/"
    with ThreadPoolExecutor(3) as pool:
        summaries = list(pool.map(lambda _: sweep_prefix(uri, settings, page_size=4), range(3)))
    assert sum(s.registered for s in summaries) == 30
    assert len(source_versions(settings, s3_bucket)) == 30


def test_sweep_marks_deleted_and_changed_objects_and_skips_own_results(settings, s3_bucket):
    for name in ("keep", "change", "delete"):
        put(s3_bucket, f"w/{name}.pdf", name.encode())
    put(s3_bucket, "ocrflow-results/old/document.md", b"# our own output")
    uri = f"s3://{s3_bucket}/"
    assert sweep_prefix(uri, settings).registered == 3

    put(s3_bucket, "w/change.pdf", b"changed")
    s3_client().delete_object(Bucket=s3_bucket, Key="w/delete.pdf")
    summary = sweep_prefix(uri, settings)
    assert (summary.registered, summary.deleted, summary.complete) == (1, 2, True)
    live = {v.key for v in source_versions(settings, s3_bucket) if v.deleted_at is None}
    assert live == {"w/keep.pdf", "w/change.pdf"}
    assert counts(settings, s3_bucket)["deleted"] == 2


def test_backfill_of_200_objects_paginates_and_resumes_after_interruption(settings, s3_bucket):
    for i in range(200):
        put(s3_bucket, f"backfill/{i:03d}.pdf", f"doc {i}".encode())
    uri = f"s3://{s3_bucket}/backfill"

    first = sweep_prefix(uri, settings, page_size=9, max_pages=5)  # interrupted
    assert (first.listed, first.registered, first.complete) == (45, 45, False)
    with session_scope(settings.database_url) as session:
        watched = session.scalars(
            select(WatchedPrefix).where(WatchedPrefix.bucket == s3_bucket)
        ).one()
        assert watched.cursor == "backfill/044.pdf"

    rest = sweep_prefix(uri, settings, page_size=9)
    assert (rest.listed, rest.registered, rest.deleted, rest.complete) == (155, 155, 0, True)
    registered = source_versions(settings, s3_bucket)
    assert len(registered) == len({v.key for v in registered}) == 200
    assert counts(settings, s3_bucket) == {"pending": 200, "deleted": 0}


def claim(settings: Settings, bucket: str, worker: str, lease: float, **options):
    with session_scope(settings.database_url) as session:
        return claim_next(
            session=session,
            worker=worker,
            lease=timedelta(seconds=lease),
            max_attempts=3,
            bucket=bucket,
            **options,
        )


def test_a_version_whose_claims_all_expired_ends_failed_with_the_reason(settings, s3_bucket):
    put(s3_bucket, "dies.pdf", b"bytes")
    reconcile_keys([S3Location(s3_bucket, "dies.pdf")], settings)
    for attempt in (1, 2, 3):  # each run holding it is killed: its lease simply runs out
        taken = claim(settings, s3_bucket, f"run-{attempt}", lease=0)
        assert taken is not None and taken.attempt == attempt

    assert claim(settings, s3_bucket, "run-4", lease=0) is None
    [version] = source_versions(settings, s3_bucket)
    assert version.status == "failed"  # once: `claimed` forever, never retried, never failed
    assert version.error.startswith("claim expired on each of 3 attempts")
    assert "run-3" in version.error


def test_an_earlier_error_is_kept_when_the_last_claim_expires(settings, s3_bucket):
    put(s3_bucket, "flaky.pdf", b"bytes")
    reconcile_keys([S3Location(s3_bucket, "flaky.pdf")], settings)
    first = claim(settings, s3_bucket, "a", lease=3600)
    with session_scope(settings.database_url) as session:
        finish_claim(session=session, claim=first, status="pending", error="S3 throttled")
    assert claim(settings, s3_bucket, "b", lease=0).attempt == 2
    assert claim(settings, s3_bucket, "c", lease=0).attempt == 3
    assert claim(settings, s3_bucket, "d", lease=0) is None
    [version] = source_versions(settings, s3_bucket)
    assert (version.status, version.error) == (
        "failed",
        "claim expired on attempt 3 of 3; before that: S3 throttled",
    )


def test_a_renewed_claim_is_not_taken_over_and_a_lost_one_cannot_be_renewed(settings, s3_bucket):
    put(s3_bucket, "long.pdf", b"bytes")
    reconcile_keys([S3Location(s3_bucket, "long.pdf")], settings)
    held = claim(settings, s3_bucket, "long-run", lease=3600)
    with session_scope(settings.database_url) as session:
        assert renew_claim(session=session, claim=held)
    assert claim(settings, s3_bucket, "other", lease=60) is None  # renewed just now

    retaken = claim(settings, s3_bucket, "other", lease=0)  # its lease ran out after all
    with session_scope(settings.database_url) as session:
        assert not renew_claim(session=session, claim=held)  # fenced by holder and attempt
        assert renew_claim(session=session, claim=retaken)


def test_a_refunded_outage_keeps_the_attempt_and_excluded_ids_wait(settings, s3_bucket):
    put(s3_bucket, "a.pdf", b"a")
    reconcile_keys([S3Location(s3_bucket, "a.pdf")], settings)
    first = claim(settings, s3_bucket, "w", lease=3600)
    with session_scope(settings.database_url) as session:
        finish_claim(session=session, claim=first, status="pending", error="away", refund=True)
    assert claim(settings, s3_bucket, "w", lease=3600, exclude={first.id}) is None
    again = claim(settings, s3_bucket, "w", lease=3600)
    assert again.attempt == 1  # the outage used no attempt


POISON_KEYS = ["in/b\x00nul.pdf", "in/c\x01ctl.pdf", "in/d\x7fdel.pdf", "in/e" + "x" * 1100]


def test_a_sweep_skips_poison_keys_and_its_cursor_moves_past_them(settings, s3_bucket):
    for key in ["in/a.pdf", *POISON_KEYS, "in/f.pdf", "in/g.pdf"]:
        put(s3_bucket, key, key.encode()[:50])
    uri = f"s3://{s3_bucket}/in/"

    first = sweep_prefix(uri, settings, page_size=2, max_pages=1)  # the page ends on the NUL key
    assert (first.listed, first.registered, first.skipped, first.complete) == (2, 1, 1, False)
    with session_scope(settings.database_url) as session:
        cursor = session.scalars(
            select(WatchedPrefix.cursor).where(WatchedPrefix.bucket == s3_bucket)
        ).one()
    assert cursor == "in/b"  # cut before the NUL: storable in Postgres, accepted by S3

    rest = sweep_prefix(uri, settings, page_size=2)  # re-lists only the NUL key, then goes on
    assert (rest.listed, rest.registered, rest.skipped, rest.complete) == (6, 2, 4, True)
    assert [s.key for s in rest.skipped_keys] == POISON_KEYS
    errors = [s.error for s in rest.skipped_keys]
    assert "U+0000" in errors[0] and "U+0001" in errors[1] and "U+007F" in errors[2]
    assert "1,104 bytes" in errors[3]
    assert [v.key for v in source_versions(settings, s3_bucket)] == [
        "in/a.pdf",
        "in/f.pdf",
        "in/g.pdf",
    ]
    again = sweep_prefix(uri, settings, page_size=2)  # a new pass: skipped again, not failed
    assert (again.registered, again.skipped, again.complete) == (0, 4, True)


def test_listed_objects_are_split_into_usable_and_skipped():
    settings = Settings(results_prefix="ocrflow-results/")
    listed = [S3Object("b", key, 1, "e") for key in ["ok.pdf", "bad\x00.pdf", ""]]
    listed.append(S3Object("b", "ocrflow-results/b/x/document.md", 1, "e"))
    usable, skipped = usable_objects(listed, settings)
    assert [o.key for o in usable] == ["ok.pdf"]  # our own results are dropped silently
    assert [(s.key, "U+0000" in s.error) for s in skipped] == [("bad\x00.pdf", True), ("", False)]


def test_a_version_the_database_refuses_is_skipped_alone(postgres_url, s3_bucket):
    settings = Settings(database_url=postgres_url)
    objects = [
        S3Object(s3_bucket, "a.pdf", 1, "etag-a"),
        S3Object(s3_bucket, "b.pdf", 1, "e" * 300),  # over the column's 255: a DataError
        S3Object(s3_bucket, "c.pdf", 1, "etag-c"),
    ]
    registered, refused = register_each(objects, settings)
    assert registered == 2 and [s.key for s in refused] == ["b.pdf"]
    assert [v.key for v in source_versions(settings, s3_bucket)] == ["a.pdf", "c.pdf"]


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_registry_migration_downgrades_and_upgrades(store, tmp_path):
    from alembic import command
    from sqlalchemy import inspect

    from infra.db.migrate import alembic_config, upgrade
    from infra.db.session import POSTGRES_SCHEMA, get_engine
    from tests.conftest import _create_database, _drop_database

    name, url = _create_database() if store == "postgres" else (None, f"sqlite:///{tmp_path}/m.db")
    schema = POSTGRES_SCHEMA if name else None
    try:
        upgrade(url)
        command.downgrade(alembic_config(url), "0001")
        tables = set(inspect(get_engine(url)).get_table_names(schema=schema))
        assert "document" in tables and not {"source_object", "watched_prefix"} & tables
        upgrade(url)
        tables = set(inspect(get_engine(url)).get_table_names(schema=schema))
        assert {"source_object", "watched_prefix"} <= tables
    finally:
        get_engine(url).dispose()
        if name:
            _drop_database(name)
