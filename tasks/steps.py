"""Prefect tasks: thin wrappers over the plain functions, with the retry policy on the decorator.

One task per document step or per page window, never one per page (Prefect's per-task overhead
does not scale to millions of pages; page state lives in our Postgres).
"""

from __future__ import annotations

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
from infra.errors import is_transient
from infra.s3 import S3Object
from infra.settings import PIPELINE_VERSION, Settings
from models.registry import build_engine
from tasks.exports.document import load_export_document
from tasks.pages import PagePlan, plan_pages, recognize_pages
from tasks.results_s3 import write_results
from tasks.split import open_document


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
def route_pages(path: Path, page_numbers: list[int], settings: Settings) -> list[PagePlan]:
    return plan_pages(path, settings, page_numbers)


@task(cache_policy=NO_CACHE)
def run_ocr_batch(path: Path, plans: list[PagePlan], settings: Settings) -> list[PageRecord]:
    return recognize_pages(path, settings, plans, build_engine(settings))


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        max_failures=settings.page_max_attempts,
        base_seconds=settings.page_retry_base_seconds,
        max_seconds=settings.page_retry_max_seconds,
    )


@io_task
def persist_pages(document_id: int, records: list[PageRecord], settings: Settings) -> None:
    """One transaction per page: a crash loses at most the page being written, and a retry
    after a dropped connection rewrites nothing (attempts are keyed)."""
    policy = retry_policy(settings)
    for record in records:
        with session_scope(settings.database_url) as session:
            repository.record_page(
                session=session, document_id=document_id, page=record, retry=policy
            )


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
