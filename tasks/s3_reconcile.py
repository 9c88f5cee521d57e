"""Make the registry match the bucket: per key (for events) or per prefix (for sweeps).

Both paths ask S3 for the current state instead of trusting what an event said, so a
duplicate, late or out-of-order event changes nothing that is not true any more. Sweeps skip
our own results under the results prefix (they would be ingested in a loop); the event
intake drops their events before they get here.

A key that can never be registered (control characters such as NUL, which Postgres cannot even
store; an empty or over-long key) is skipped and reported, never retried: one poison object in
a prefix must not stop the sweep, or keep its cursor from moving past it, forever.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.exc import DataError

from infra.db.models import utcnow
from infra.db.registry import (
    begin_pass,
    finish_pass,
    mark_versions_deleted,
    register_versions,
    save_cursor,
)
from infra.db.session import session_scope
from infra.errors import PermanentInputError
from infra.s3 import S3Location, S3Object, check_object_key, parse_s3_uri
from infra.settings import Settings
from tasks.results_s3 import is_results_key
from tasks.s3_source import LIST_PAGE_SIZE, find_s3_object, list_s3_pages

logger = logging.getLogger("ocrflow.sweep")

MAX_REPORTED_SKIPS = 100  # keys listed in a sweep's summary; the count covers them all


@dataclass(frozen=True)
class SkippedKey:
    """An object we will not register, and why."""

    bucket: str
    key: str
    error: str


@dataclass
class ReconcileSummary:
    checked: int = 0  # keys asked about
    registered: int = 0  # content versions new to the registry
    deleted: int = 0  # versions marked deleted (key gone or overwritten)
    skipped: list[SkippedKey] = field(default_factory=list)  # keys that cannot be registered


@dataclass
class SweepSummary:
    uri: str
    listed: int = 0
    registered: int = 0
    deleted: int = 0
    skipped: int = 0  # objects that can never be registered (see `skipped_keys`)
    skipped_keys: list[SkippedKey] = field(default_factory=list)  # the first MAX_REPORTED_SKIPS
    complete: bool = False  # False: stopped at max_pages; the next sweep resumes

    def add_skipped(self, skipped: Sequence[SkippedKey]) -> None:
        self.skipped += len(skipped)
        room = MAX_REPORTED_SKIPS - len(self.skipped_keys)
        self.skipped_keys.extend(skipped[: max(room, 0)])


def is_bad_key_error(exc: BaseException) -> bool:
    """Whether registering failed because of the object itself (its key), not an outage."""
    return isinstance(exc, PermanentInputError | DataError)


def reconcile_keys(
    locations: Iterable[S3Location], settings: Settings, *, by_event: bool = True
) -> ReconcileSummary:
    """HEADs each key once; registers its current version and marks the others deleted.

    A key that cannot be registered is reported in `skipped`; outages propagate.
    """
    summary = ReconcileSummary()
    for location in dict.fromkeys(locations):  # a burst often names one key many times
        try:
            check_object_key(location.key)
            deleted, registered = _reconcile_key(location, settings, by_event)
        except Exception as exc:
            if not is_bad_key_error(exc):
                raise
            summary.skipped.append(_skipped(location.bucket, location.key, exc))
            continue
        summary.deleted += deleted
        summary.registered += registered
        summary.checked += 1
    return summary


def _reconcile_key(location: S3Location, settings: Settings, by_event: bool) -> tuple[int, int]:
    current = find_s3_object(location.uri)
    now = utcnow()
    with session_scope(settings.database_url) as session:
        deleted = mark_versions_deleted(
            session=session,
            bucket=location.bucket,
            key=location.key,
            keep_etag=current.etag if current else None,
            at=now,
        )
        registered = 0
        if current is not None:
            registered = register_versions(
                session=session, objects=[current], seen_at=now, by_event=by_event
            )
    return deleted, registered


def usable_objects(
    objects: Iterable[S3Object], settings: Settings
) -> tuple[list[S3Object], list[SkippedKey]]:
    """Splits a listing page into objects to register and keys that never can be; our own
    results are dropped silently."""
    usable: list[S3Object] = []
    skipped: list[SkippedKey] = []
    for obj in objects:
        try:
            check_object_key(obj.key)
        except PermanentInputError as exc:
            skipped.append(_skipped(obj.bucket, obj.key, exc))
            continue
        if not is_results_key(obj.bucket, obj.key, settings):
            usable.append(obj)
    return usable, skipped


def sweep_prefix(
    uri: str,
    settings: Settings,
    *,
    page_size: int = LIST_PAGE_SIZE,
    max_pages: int | None = None,
) -> SweepSummary:
    """Lists a watched prefix page by page and registers what the registry has not seen.

    Each page commits with its cursor, so an interrupted (or `max_pages`-bounded) sweep resumes
    after the last committed page. When a pass completes, versions it did not see are marked
    deleted. Keys that cannot be registered are skipped, logged and listed in the summary.
    """
    location = parse_s3_uri(uri)
    prefix = location.as_prefix()
    summary = SweepSummary(uri=S3Location(location.bucket, prefix).uri)
    with session_scope(settings.database_url) as session:
        sweep = begin_pass(session=session, bucket=location.bucket, prefix=prefix)

    pages = list_s3_pages(
        location.bucket, prefix, page_size=page_size, start_after=sweep.start_after
    )
    for pages_done, page in enumerate(pages, start=1):
        if not page:
            continue
        objects, skipped = usable_objects(page, settings)
        cursor = resumable_cursor(page[-1].key)
        try:
            with session_scope(settings.database_url) as session:
                summary.registered += register_versions(
                    session=session, objects=objects, seen_at=utcnow()
                )
                save_cursor(session=session, sweep=sweep, cursor=cursor, listed=len(page))
        except Exception as exc:
            if not is_bad_key_error(exc):
                raise
            # Some object the checks let through still cannot be stored: find it one by one.
            registered, refused = register_each(objects, settings)
            summary.registered += registered
            skipped += refused
            with session_scope(settings.database_url) as session:
                save_cursor(session=session, sweep=sweep, cursor=cursor, listed=len(page))
        summary.add_skipped(skipped)
        summary.listed += len(page)
        if max_pages is not None and pages_done >= max_pages:
            return summary

    with session_scope(settings.database_url) as session:
        summary.deleted = finish_pass(session=session, sweep=sweep)
    summary.complete = True
    return summary


def resumable_cursor(last_key: str) -> str:
    """A page's last key as a cursor we can store and send back as `StartAfter`.

    A NUL can be neither stored in Postgres text nor sent to every S3 (moto answers 500), so a
    key holding one is cut before it. Resuming there re-lists only keys that share the cut
    part and hold a NUL right after it: poison keys, skipped (and counted) again.
    """
    return last_key.partition("\x00")[0]


def register_each(objects: Sequence[S3Object], settings: Settings) -> tuple[int, list[SkippedKey]]:
    """Registers objects one transaction each; those the database refuses are skipped."""
    registered = 0
    refused: list[SkippedKey] = []
    for obj in objects:
        try:
            with session_scope(settings.database_url) as session:
                registered += register_versions(session=session, objects=[obj], seen_at=utcnow())
        except Exception as exc:
            if not is_bad_key_error(exc):
                raise
            refused.append(_skipped(obj.bucket, obj.key, exc))
    return registered, refused


def _skipped(bucket: str, key: str, exc: BaseException) -> SkippedKey:
    error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    logger.warning("skipping key %r in s3://%s: %s", key, bucket, error)
    return SkippedKey(bucket, key, error)
