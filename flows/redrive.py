"""Re-run pages that did not end well, and resume documents whose run stopped or died.

    ocrflow redrive                       # failed pages everywhere, plus unfinished documents
    ocrflow redrive 12 40 --status failed,needs_review --mode gundam

Each document's source is fetched again and must still be the content that was ingested (same
sha256); its selected pages go back to pending with a fresh failure budget and are worked like
an ingest works them. The same parameters run as the `redrive` deployment from the Prefect UI.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.ingest import export_if_s3, left_incomplete, run_settings, work_document
from flows.reporting import RedriveOutcome
from infra.db import repository
from infra.db.migrate import ensure_schema
from infra.db.models import DocumentStatus, PageStatus
from infra.db.repository import RedriveTarget
from infra.db.session import session_scope
from infra.errors import PermanentInputError
from infra.settings import Settings
from infra.vocabulary import Mode
from tasks.fetch import Source, staged
from tasks.steps import restart_document

REDRIVE_STATUSES = frozenset({PageStatus.FAILED, PageStatus.NEEDS_REVIEW, PageStatus.DONE})
DEFAULT_STATUSES = (PageStatus.FAILED,)


@task(cache_policy=NO_CACHE)
def select_documents(
    document_ids: list[int] | None, statuses: list[str], settings: Settings
) -> tuple[list[RedriveTarget], list[int]]:
    with session_scope(settings.database_url) as session:
        return repository.redrive_targets(
            session=session, document_ids=document_ids, statuses=statuses
        )


@flow(name="redrive-document", flow_run_name="redrive document {target.document_id}")
def redrive_document(
    target: RedriveTarget, statuses: list[str], mode: Mode | None
) -> RedriveOutcome:
    """1. fetch the source again (it must be the same content)  2. hold the document
    3. reopen the selected pages and work every unfinished one  4. S3: write results back."""
    settings = run_settings(mode=mode)
    source = Source(target.source_uri, version_id=target.version_id, etag=target.etag)
    try:
        with staged(source, settings) as staged_file:
            if target.sha256 is not None and staged_file.sha256 != target.sha256:
                raise PermanentInputError("the source's content changed since it was ingested")
            restart_document(target.document_id, settings)
            outcome = work_document(
                target.source_uri, target.document_id, staged_file.path, settings, statuses
            )
            export_if_s3(staged_file, target.document_id, settings)
    except PermanentInputError as exc:
        get_run_logger().warning("document %d not redriven: %s", target.document_id, exc)
        return RedriveOutcome(target.document_id, DocumentStatus.FAILED, None, 0, str(exc))
    except Exception as exc:
        outcome = left_incomplete(target.source_uri, target.document_id, exc, settings)
    return RedriveOutcome(
        target.document_id,
        outcome.status,
        _page_count(target, settings),
        outcome.pages or 0,
        outcome.error,
    )


def _page_count(target: RedriveTarget, settings: Settings) -> int | None:
    with session_scope(settings.database_url) as session:
        return session.get_one(repository.Document, target.document_id).page_count


@flow(name="redrive", log_prints=True)
def redrive(
    document_ids: list[int] | None = None,
    statuses: list[str] = list(DEFAULT_STATUSES),  # noqa: B006 (Prefect parameters are copied)
    mode: Mode | None = None,
) -> list[dict]:
    """Re-runs the selected pages of the given documents (all documents when none is given)
    and resumes unfinished ones.

    Args:
        document_ids: documents to redrive; empty: every document with a page in `statuses`,
            every incomplete one, and every running one whose run died.
        statuses: page statuses to re-run (failed, needs_review, done); pending and retrying
            pages are always worked.
        mode: force one DeepSeek-OCR mode for every OCR page.
    """
    unknown = sorted(set(statuses) - REDRIVE_STATUSES)
    if unknown:
        raise ValueError(
            f"cannot redrive pages with status {unknown}; choose from {sorted(REDRIVE_STATUSES)}"
        )
    settings = run_settings(mode=mode)
    ensure_schema(settings.database_url)
    targets, missing = select_documents(document_ids or None, statuses, settings)
    outcomes = [
        RedriveOutcome(document_id, DocumentStatus.FAILED, None, 0, "no such document")
        for document_id in missing
    ]
    for target in targets:
        state = redrive_document(target, statuses, mode, return_state=True)
        if state.is_completed():
            outcomes.append(state.result())
        else:
            outcomes.append(
                RedriveOutcome(
                    target.document_id, DocumentStatus.INCOMPLETE, None, 0, state.message
                )
            )
    get_run_logger().info("redrove %d documents", len(outcomes))
    return [outcome.to_dict() for outcome in sorted(outcomes, key=lambda o: o.id)]
