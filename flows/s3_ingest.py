"""Process the S3 objects the registry holds, each content version exactly once.

Events and sweeps only register versions; this flow does the work. Any number of runs may go
at once (a debounced event run, a sweep, a backfill): each version is claimed in the database
by one of them, and a run that dies leaves a lease that runs out for the next one to retake.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.ingest import ingest_document, run_settings
from flows.reporting import DocumentOutcome
from infra.db.migrate import ensure_schema
from infra.db.models import SourceObjectStatus
from infra.db.registry import ClaimedObject, claim_next, finish_claim
from infra.db.session import session_scope
from infra.errors import SourceChanged, is_transient
from infra.s3 import S3Location, S3Object
from infra.settings import RoutingPolicy, Settings
from infra.vocabulary import Mode
from tasks.s3_reconcile import reconcile_keys
from tasks.s3_source import find_s3_object

CLAIM_LEASE = timedelta(hours=6)  # longer than any one document takes
MAX_ATTEMPTS = 3


@dataclass
class ObjectsReport:
    processed: dict[str, int] = field(default_factory=dict)  # outcome -> claims that ended so

    def add(self, status: str) -> None:
        self.processed[status] = self.processed.get(status, 0) + 1


@task(cache_policy=NO_CACHE)
def claim_object(worker: str, bucket: str | None, settings: Settings) -> ClaimedObject | None:
    with session_scope(settings.database_url) as session:
        return claim_next(
            session=session,
            worker=worker,
            lease=CLAIM_LEASE,
            max_attempts=MAX_ATTEMPTS,
            bucket=bucket,
        )


@task(cache_policy=NO_CACHE)
def current_version(claim: ClaimedObject, settings: Settings) -> S3Object | None:
    """The claimed version as S3 has it now, or None if it was deleted or overwritten since."""
    current = find_s3_object(claim.uri)
    if current is not None and current.etag == claim.etag:
        return current
    # Register whatever replaced it; the replacement gets its own claim.
    reconcile_keys([S3Location(claim.bucket, claim.key)], settings, by_event=False)
    return None


@task(cache_policy=NO_CACHE)
def record_outcome(
    claim: ClaimedObject,
    status: str,
    settings: Settings,
    *,
    document_id: int | None = None,
    error: str | None = None,
) -> None:
    with session_scope(settings.database_url) as session:
        if not finish_claim(
            session=session, claim=claim, status=status, document_id=document_id, error=error
        ):
            get_run_logger().warning("lost the claim on %s; its new holder decides", claim.uri)


@flow(name="ingest-s3-objects", log_prints=True)
def ingest_s3_objects(
    policy: RoutingPolicy | None = None,
    mode: Mode | None = None,
    bucket: str | None = None,
    limit: int | None = None,
) -> dict[str, int]:
    """Claims registered S3 versions one at a time until none is left (or `limit`):
    1. claim  2. check it is still the object's content  3. ingest it (results are written
    back to S3)  4. record the outcome.

    Args:
        policy: `auto` keeps trustworthy text layers; `always-ocr` OCRs every non-blank page.
        mode: force one DeepSeek-OCR mode for every OCR page.
        bucket: only objects of this bucket (default: all).
        limit: stop after this many objects (the rest waits for the next run).
    """
    settings = run_settings(policy, mode)
    ensure_schema(settings.database_url)
    worker = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
    report = ObjectsReport()
    while limit is None or sum(report.processed.values()) < limit:
        claim = claim_object(worker, bucket, settings)
        if claim is None:
            break
        status = process_claim(claim, policy, mode, settings)
        report.add("retried" if status == SourceObjectStatus.PENDING else status)
    get_run_logger().info("S3 objects processed: %s", report.processed or "none pending")
    return report.processed


def process_claim(
    claim: ClaimedObject, policy: RoutingPolicy | None, mode: Mode | None, settings: Settings
) -> str:
    """Steps 2-4 for one claim; returns the registry status it ended in.

    Whatever happens, the claim is settled: a transient failure returns the version to the
    queue (up to MAX_ATTEMPTS), anything else is recorded as failed with its reason.
    """
    obj = current_version(claim, settings)
    if obj is None:
        record_outcome(claim, SourceObjectStatus.GONE, settings)
        return SourceObjectStatus.GONE
    try:
        outcome: DocumentOutcome = ingest_document(
            claim.uri, policy, mode, etag=claim.etag, version_id=claim.version_id
        )  # writes results back
    except SourceChanged:  # overwritten between our check and the download: that version is gone
        reconcile_keys([S3Location(claim.bucket, claim.key)], settings, by_event=False)
        record_outcome(claim, SourceObjectStatus.GONE, settings)
        return SourceObjectStatus.GONE
    except Exception as exc:
        retry = is_transient(exc) and claim.attempt < MAX_ATTEMPTS
        status = SourceObjectStatus.PENDING if retry else SourceObjectStatus.FAILED
        record_outcome(claim, status, settings, error=f"{type(exc).__name__}: {exc}")
        return status
    status = SourceObjectStatus.FAILED if outcome.status == "failed" else SourceObjectStatus.DONE
    record_outcome(claim, status, settings, document_id=outcome.id, error=outcome.error)
    return status
