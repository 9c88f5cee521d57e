"""Prefect tasks: thin wrappers over the plain functions, with the retry policy on the decorator.

One task per document step or per page window, never one per page (Prefect's per-task overhead
does not scale to millions of pages; page state lives in our Postgres).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from infra.db import repository
from infra.db.models import Document, DocumentStatus
from infra.db.queries import document_view
from infra.db.repository import Claim, DocumentIdentity, PageRecord, RetryPolicy
from infra.db.session import session_scope
from infra.errors import is_infrastructure, is_transient
from infra.s3 import S3Object
from infra.settings import PIPELINE_VERSION, Settings
from models.queue_engine import QueueEngine
from models.registry import build_engine
from tasks.exports.document import load_export_document
from tasks.pages import plan_pages, recognize_pages
from tasks.queued import recognize_window
from tasks.results_s3 import write_results
from tasks.split import open_document

logger = logging.getLogger(__name__)


def _retry_transient(_task, _run, state) -> bool:
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


io_task = task(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=_retry_transient,
    cache_policy=NO_CACHE,
)


@io_task
def register_document(identity: DocumentIdentity, settings: Settings) -> Claim:
    with session_scope(settings.database_url) as session:
        return repository.claim_document(
            session=session,
            identity=identity,
            pipeline_version=PIPELINE_VERSION,
            lease_seconds=settings.document_lease_seconds,
        )


@io_task
def restart_document(document_id: int, settings: Settings) -> None:
    """Holds an already registered document for a new run (`redrive`)."""
    with session_scope(settings.database_url) as session:
        repository.start_run(
            session=session,
            document=session.get_one(Document, document_id),
            lease_seconds=settings.document_lease_seconds,
        )


@io_task
def record_failure(
    document_id: int, error: str, settings: Settings, status: str = DocumentStatus.FAILED
) -> None:
    with session_scope(settings.database_url) as session:
        repository.record_document_failure(
            session=session, document_id=document_id, error=error, status=status
        )


def renew_document_lease(document_id: int, settings: Settings) -> None:
    """Called from the run's heartbeat thread (plain function: not a Prefect task)."""
    with session_scope(settings.database_url) as session:
        repository.renew_lease(
            session=session, document_id=document_id, lease_seconds=settings.document_lease_seconds
        )


@task(cache_policy=NO_CACHE)
def split_document(
    document_id: int, path: Path, settings: Settings, reopen: Collection[str] = ()
) -> list[list[int]]:
    """Opens the document (limits checked there) and returns the pages this run works, in
    windows: the unfinished ones, plus those in `reopen` statuses (redrive) put back first."""
    with open_document(path, settings) as document:
        page_count, media_type = document.page_count, document.media_type
    with session_scope(settings.database_url) as session:
        repository.set_page_count(
            session=session, document_id=document_id, page_count=page_count, media_type=media_type
        )
        repository.reopen_pages(session=session, document_id=document_id, statuses=reopen)
        todo = repository.pages_to_run(
            session=session, document_id=document_id, page_count=page_count
        )
    size = settings.page_window
    return [todo[i : i + size] for i in range(0, len(todo), size)]


@task(cache_policy=NO_CACHE)
def work_window(
    document_id: int, path: Path, page_numbers: list[int], settings: Settings, order: int = 0
) -> bool:
    """Routes and recognises a window, each page stored as it settles; True when the engine
    was away (submit no more windows). A page that could not be stored is raised after the
    rest of the window was (the run ends incomplete; the next one resumes the page).

    `order`: the window's place in its document; the queue renders earlier windows first."""
    writer = PageWriter(document_id, settings)
    engine = build_engine(settings)
    if isinstance(engine, QueueEngine):
        records = recognize_window(path, settings, page_numbers, engine, writer.write, order)
    else:
        plans = plan_pages(path, settings, page_numbers)
        records = recognize_pages(path, settings, plans, engine, writer.write)
    writer.raise_first_fault()
    return any(record.infrastructure_error for record in records)


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        max_failures=settings.page_max_attempts,
        base_seconds=settings.page_retry_base_seconds,
        max_seconds=settings.page_retry_max_seconds,
    )


WRITE_BATCH_PAGES = 8  # pages per transaction: a crash mid-write loses at most these (resumed)
WRITE_RETRY_SECONDS = (2.0, 4.0, 8.0)  # as `io_task`: three more tries while the database is away


class PageWriter:
    """Stores pages as they settle: those that settle together in a few transactions; when
    one fails, each of its pages on its own, retried while the database is away, so one
    page's fault loses no other page. A retried write adds nothing (attempts are keyed)."""

    def __init__(self, document_id: int, settings: Settings) -> None:
        self.document_id, self.settings = document_id, settings
        self.policy = retry_policy(settings)
        self.faults: list[Exception] = []

    def write(self, records: list[PageRecord]) -> None:
        for start in range(0, len(records), WRITE_BATCH_PAGES):
            batch = records[start : start + WRITE_BATCH_PAGES]
            try:
                self._store(batch)
            except Exception:
                for record in batch:
                    self._store_alone(record)

    def raise_first_fault(self) -> None:
        if self.faults:
            raise self.faults[0]

    def _store(self, records: list[PageRecord]) -> None:
        with session_scope(self.settings.database_url) as session:
            repository.record_pages(
                session=session, document_id=self.document_id, pages=records, retry=self.policy
            )

    def _store_alone(self, record: PageRecord) -> None:
        for delay in (*WRITE_RETRY_SECONDS, None):
            try:
                self._store([record])
                return
            except Exception as error:
                if delay is None or not is_infrastructure(error):
                    logger.warning("page %d not stored: %s", record.page_no, error)
                    self.faults.append(error)
                    return
                time.sleep(delay)


@io_task
def export_results(obj: S3Object, document_id: int, settings: Settings) -> list[str]:
    """Writes the document's markdown, JSON, figures, text, ALTO and searchable PDF under the
    results prefix in S3."""
    with session_scope(settings.database_url) as session:
        view = document_view(session=session, document_id=document_id)
        if view is None:
            return []
        document = load_export_document(session=session, document_id=document_id)
    return write_results(obj, view, settings, document=document)


@io_task
def finish_document(document_id: int, settings: Settings) -> tuple[str, str | None]:
    """The document's status after this run, and why it is not done."""
    with session_scope(settings.database_url) as session:
        status = repository.finish_document(session=session, document_id=document_id)
        return status, session.get_one(Document, document_id).error
