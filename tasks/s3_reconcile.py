"""Make the registry match the bucket: per key (for events) or per prefix (for sweeps).

Both paths ask S3 for the current state instead of trusting what an event said, so a
duplicate, late or out-of-order event changes nothing that is not true any more. Sweeps skip
our own results under the results prefix (they would be ingested in a loop); the event
intake drops their events before they get here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from infra.db.models import utcnow
from infra.db.registry import (
    begin_pass,
    finish_pass,
    mark_versions_deleted,
    register_versions,
    save_cursor,
)
from infra.db.session import session_scope
from infra.s3 import S3Location, parse_s3_uri
from infra.settings import Settings
from tasks.results_s3 import is_results_key
from tasks.s3_source import LIST_PAGE_SIZE, find_s3_object, list_s3_pages


@dataclass
class ReconcileSummary:
    checked: int = 0  # keys asked about
    registered: int = 0  # content versions new to the registry
    deleted: int = 0  # versions marked deleted (key gone or overwritten)


@dataclass
class SweepSummary:
    uri: str
    listed: int = 0
    registered: int = 0
    deleted: int = 0
    complete: bool = False  # False: stopped at max_pages; the next sweep resumes


def reconcile_keys(
    locations: Iterable[S3Location], settings: Settings, *, by_event: bool = True
) -> ReconcileSummary:
    """HEADs each key once; registers its current version and marks the others deleted."""
    summary = ReconcileSummary()
    for location in dict.fromkeys(locations):  # a burst often names one key many times
        current = find_s3_object(location.uri)
        now = utcnow()
        with session_scope(settings.database_url) as session:
            summary.deleted += mark_versions_deleted(
                session=session,
                bucket=location.bucket,
                key=location.key,
                keep_etag=current.etag if current else None,
                at=now,
            )
            if current is not None:
                summary.registered += register_versions(
                    session=session, objects=[current], seen_at=now, by_event=by_event
                )
        summary.checked += 1
    return summary


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
    deleted.
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
        objects = [o for o in page if not is_results_key(o.bucket, o.key, settings)]
        with session_scope(settings.database_url) as session:
            summary.registered += register_versions(
                session=session, objects=objects, seen_at=utcnow()
            )
            save_cursor(session=session, sweep=sweep, cursor=page[-1].key, listed=len(page))
        summary.listed += len(page)
        if max_pages is not None and pages_done >= max_pages:
            return summary

    with session_scope(settings.database_url) as session:
        summary.deleted = finish_pass(session=session, sweep=sweep)
    summary.complete = True
    return summary
