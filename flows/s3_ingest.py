"""Process the S3 objects the registry holds, each content version exactly once.

Events and sweeps only register versions; this flow does the work. Any number of runs may go
at once (a debounced event run, a sweep, a backfill): each version is claimed in the database
by one of them under a lease (`OCRFLOW_S3_CLAIM_LEASE_SECONDS`) that a heartbeat renews while
the document is processed. A run killed outright stops renewing, its lease runs out, and the
next run retakes the version; after `OCRFLOW_S3_MAX_ATTEMPTS` claims it ends failed.
"""

from __future__ import annotations

import logging
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
from infra.db.registry import ClaimedObject, claim_next, finish_claim, renew_claim
from infra.db.session import session_scope
from infra.errors import SourceChanged, is_infrastructure, is_transient
from infra.heartbeat import Heartbeat
from infra.s3 import S3Location, S3Object
from infra.settings import RoutingPolicy, Settings
from infra.vocabulary import Mode
from tasks.s3_reconcile import reconcile_keys
from tasks.s3_source import find_s3_object

logger = logging.getLogger("ocrflow.s3")

DONE_OUTCOMES = frozenset({"done", "skipped"})  # skipped: the same bytes were done before
FAILED_OUTCOME = "failed"  # anything else ("incomplete": pages left to retry) is retried
OUTAGES_IN_A_ROW = 3  # claims ended by an outage, one after another, before a run gives up


@dataclass(frozen=True)
class ClaimEnding:
    """How one claim ended: the registry status it is left in, and what to record with it."""

    status: str
    document_id: int | None = None
    error: str | None = None
    refund: bool = False  # an outage: the attempt is given back
    outage: bool = False  # S3 or the database was away (or this one object made it look so)

    @property
    def report_key(self) -> str:
        return "retried" if self.status == SourceObjectStatus.PENDING else self.status


@dataclass
class ObjectsReport:
    processed: dict[str, int] = field(default_factory=dict)  # outcome -> claims that ended so

    def add(self, outcome: str) -> None:
        self.processed[outcome] = self.processed.get(outcome, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.processed.values())


@task(cache_policy=NO_CACHE)
def claim_object(
    worker: str, bucket: str | None, settings: Settings, exclude: frozenset[int] = frozenset()
) -> ClaimedObject | None:
    with session_scope(settings.database_url) as session:
        return claim_next(
            session=session,
            worker=worker,
            lease=timedelta(seconds=settings.s3_claim_lease_seconds),
            max_attempts=settings.s3_max_attempts,
            bucket=bucket,
            exclude=exclude,
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
def record_outcome(claim: ClaimedObject, ending: ClaimEnding, settings: Settings) -> None:
    with session_scope(settings.database_url) as session:
        if not finish_claim(
            session=session,
            claim=claim,
            status=ending.status,
            document_id=ending.document_id,
            error=ending.error,
            refund=ending.refund,
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

    A version returned for a retry is not claimed again by the same run. Outages on several
    claims in a row stop the run (the rest stays pending for the next one); a single one may
    be that object's own doing, and must not hold back the others.

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
    returned: set[int] = set()
    outages = 0
    while limit is None or report.total < limit:
        claim = claim_object(worker, bucket, settings, frozenset(returned))
        if claim is None:
            break
        ending = process_claim(claim, policy, mode, settings)
        report.add(ending.report_key)
        if ending.status == SourceObjectStatus.PENDING:
            returned.add(claim.id)
        outages = outages + 1 if ending.outage else 0
        if outages >= OUTAGES_IN_A_ROW:
            get_run_logger().warning("%s; the rest waits for the next run", ending.error)
            break
    get_run_logger().info("S3 objects processed: %s", report.processed or "none pending")
    return report.processed


def process_claim(
    claim: ClaimedObject, policy: RoutingPolicy | None, mode: Mode | None, settings: Settings
) -> ClaimEnding:
    """Steps 2-4 for one claim, its lease renewed throughout; returns how it ended.

    Whatever happens, the claim is settled: done, failed with its reason, gone, or back to
    pending (a transient failure or an incomplete document, while attempts remain; an outage
    without using up an attempt).
    """
    with claim_heartbeat(claim, settings):
        try:
            ending = _work(claim, policy, mode, settings)
        except Exception as exc:
            ending = _after_exception(claim, exc, settings)
    record_outcome(claim, ending, settings)
    return ending


def _work(
    claim: ClaimedObject, policy: RoutingPolicy | None, mode: Mode | None, settings: Settings
) -> ClaimEnding:
    if current_version(claim, settings) is None:
        return ClaimEnding(SourceObjectStatus.GONE)
    try:
        outcome: DocumentOutcome = ingest_document(
            claim.uri, policy, mode, etag=claim.etag, version_id=claim.version_id
        )  # writes results back
    except SourceChanged:  # overwritten between our check and the download: that version is gone
        reconcile_keys([S3Location(claim.bucket, claim.key)], settings, by_event=False)
        return ClaimEnding(SourceObjectStatus.GONE)
    if outcome.status in DONE_OUTCOMES:
        return ClaimEnding(SourceObjectStatus.DONE, outcome.id, outcome.error)
    if outcome.status == FAILED_OUTCOME:
        return ClaimEnding(SourceObjectStatus.FAILED, outcome.id, outcome.error)
    # Incomplete: pages were left to retry (no GPU worker, S3 or the database blinked).
    if _no_longer_current(claim, settings):
        return ClaimEnding(SourceObjectStatus.GONE, outcome.id)
    return _retry_or_fail(
        claim, settings, outcome.error or f"document {outcome.status}", outcome.id
    )


def _after_exception(claim: ClaimedObject, exc: Exception, settings: Settings) -> ClaimEnding:
    error = f"{type(exc).__name__}: {exc}"
    if is_infrastructure(exc):
        return ClaimEnding(SourceObjectStatus.PENDING, error=error, refund=True, outage=True)
    if is_transient(exc):
        return _retry_or_fail(claim, settings, error)
    return ClaimEnding(SourceObjectStatus.FAILED, error=error)


def _retry_or_fail(
    claim: ClaimedObject, settings: Settings, error: str, document_id: int | None = None
) -> ClaimEnding:
    if claim.attempt < settings.s3_max_attempts:
        return ClaimEnding(SourceObjectStatus.PENDING, document_id, error)
    return ClaimEnding(SourceObjectStatus.FAILED, document_id, error)


def _no_longer_current(claim: ClaimedObject, settings: Settings) -> bool:
    try:
        return current_version(claim, settings) is None
    except Exception:  # S3 away again: keep the version; the next attempt checks
        return False


def claim_heartbeat(claim: ClaimedObject, settings: Settings) -> Heartbeat:
    """Renews the claim's lease every third of it while a block runs, so a long document keeps
    its claim and a killed run loses it within one lease."""

    def renew() -> None:
        with session_scope(settings.database_url) as session:
            if not renew_claim(session=session, claim=claim):
                logger.warning("lost the claim on %s; its new holder decides", claim.uri)

    every = settings.s3_claim_lease_seconds / 3
    return Heartbeat(renew, every=every, name=f"s3-claim-{claim.id}")
