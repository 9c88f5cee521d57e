"""The ingest flows: documents in, routed and recognised pages out, state in our database.

ocrflow ingest samples/          # or: python -m flows.ingest
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextvars import copy_context
from functools import partial
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture

from flows.reporting import DocumentOutcome, IngestReport, skipped_outcome
from infra.db.migrate import ensure_schema
from infra.db.models import DocumentStatus
from infra.errors import PermanentInputError
from infra.heartbeat import Heartbeat
from infra.settings import RoutingPolicy, Settings
from infra.vocabulary import Mode
from tasks.fetch import Source, StagedFile, resolve_sources, staged, unread_identity
from tasks.pages import prime_cpu_worker
from tasks.parallel import document_concurrency, warm_up, windows_in_flight
from tasks.steps import (
    export_results,
    finish_document,
    io_task,
    record_failure,
    register_document,
    renew_document_lease,
    split_document,
    work_window,
)


def run_settings(policy: RoutingPolicy | None = None, mode: Mode | None = None) -> Settings:
    """Settings for one run: the environment, with the run's own overrides on top."""
    overrides = {}
    if policy is not None:
        overrides["routing_policy"] = policy
    if mode is not None:
        overrides["mode_override"] = mode
    return Settings(**overrides)


def work_document(
    source: str, document_id: int, path: Path, settings: Settings, reopen: Collection[str] = ()
) -> DocumentOutcome:
    """Split into windows; per window route, OCR (validate, escalate), each page stored as it
    settles; finish.

    Up to `windows_in_flight` windows are worked at once, so the GPU queue waits neither for
    the CPU side nor for a window's slowest page. The run holds the document under a lease its
    heartbeat renews. When the engine is away (no GPU worker), the pages are left retrying and
    the run stops: the next ingest, watch or redrive resumes the document.
    """
    renew = partial(renew_document_lease, document_id, settings)
    with Heartbeat(renew, every=settings.document_lease_seconds / 3, name=f"doc-{document_id}"):
        windows = split_document(document_id, path, settings, reopen)
        in_flight: deque[PrefectFuture[bool]] = deque()
        engine_away = False
        for order, page_numbers in enumerate(windows):
            in_flight.append(work_window.submit(document_id, path, page_numbers, settings, order))
            if len(in_flight) >= windows_in_flight(settings):
                engine_away = in_flight.popleft().result()
                if engine_away:
                    break
        while in_flight:
            engine_away |= in_flight.popleft().result()
        if engine_away:
            get_run_logger().warning("%s: OCR engine unavailable; resume later", source)
        status, error = finish_document(document_id, settings)
    return DocumentOutcome(source, document_id, status, sum(map(len, windows)), error)


def export_if_s3(staged_file: StagedFile, document_id: int, settings: Settings) -> None:
    if (s3_object := staged_file.s3_object()) is not None:
        export_results(s3_object, document_id, settings)


@flow(name="ingest-document", flow_run_name="ingest {source}", log_prints=True)
def ingest_document(
    source: str,
    policy: RoutingPolicy | None = None,
    mode: Mode | None = None,
    etag: str | None = None,
    version_id: str | None = None,
) -> DocumentOutcome:
    """1. fetch  2. register (skip done content)  3. work its unfinished pages
    4. S3 sources: write results back.

    `etag`/`version_id` pin an S3 source to the registered version (`SourceChanged` otherwise).
    A bad file ends `failed` with the reason; a fault (database, S3, engine away) leaves the
    document `incomplete` for the next run, never failed.
    """
    settings = run_settings(policy, mode)
    document_id: int | None = None
    try:
        with staged(Source(source, version_id=version_id, etag=etag), settings) as staged_file:
            claim = register_document(staged_file.identity(), settings)
            document_id = claim.document_id
            if claim.already_done:
                outcome = skipped_outcome(source, document_id, settings)
            else:
                outcome = work_document(source, document_id, staged_file.path, settings)
            export_if_s3(staged_file, document_id, settings)
            return outcome
    except PermanentInputError as exc:
        if document_id is None:  # rejected before identity (size limit): register it anyway
            document_id = register_document(unread_identity(source), settings).document_id
        record_failure(document_id, str(exc), settings)
        get_run_logger().warning("%s failed: %s", source, exc)
        return DocumentOutcome(source, document_id, DocumentStatus.FAILED, None, str(exc))
    except Exception as exc:
        return left_incomplete(source, document_id, exc, settings)


def left_incomplete(
    source: str, document_id: int | None, exc: Exception, settings: Settings
) -> DocumentOutcome:
    """A fault, not a verdict: record it where the database lets us; the next run resumes."""
    error = f"{type(exc).__name__}: {exc}"
    get_run_logger().warning("%s left incomplete: %s", source, error)
    if document_id is not None:
        try:
            record_failure(document_id, error, settings, DocumentStatus.INCOMPLETE)
        except Exception:  # the database itself is away: the document's lease runs out instead
            get_run_logger().warning("could not record the fault of %s", source)
    return DocumentOutcome(source, document_id, DocumentStatus.INCOMPLETE, None, error)


@io_task
def publish_run_summary(report: IngestReport, settings: Settings) -> dict:
    """The run's summary artifacts; a database outage while reading them is retried."""
    return report.publish_summary(settings)


@flow(name="ingest", log_prints=True)
def ingest(
    sources: list[str], policy: RoutingPolicy | None = None, mode: Mode | None = None
) -> list[dict]:
    """Ingests files, directories and `s3://` prefixes; one failed document never stops the rest.

    Args:
        sources: paths, directories or s3:// URIs.
        policy: `auto` keeps trustworthy text layers; `always-ocr` OCRs every non-blank page.
        mode: force one DeepSeek-OCR mode for every OCR page (tiny, small, base, large, gundam).
    """
    settings = run_settings(policy, mode)
    warm_up(prime_cpu_worker, settings)  # CPU workers start while the sources are listed
    ensure_schema(settings.database_url)
    documents = resolve_sources(sources)
    report = IngestReport(total=len(documents))

    def one(uri: str) -> DocumentOutcome:
        state = ingest_document(uri, policy, mode, return_state=True)
        if state.is_completed():
            return state.result()
        return DocumentOutcome(uri, None, DocumentStatus.INCOMPLETE, None, state.message)

    # `document_concurrency` documents at once (threads: each mostly waits on the GPU queue or
    # on the CPU worker processes; each carries this run's context, so its flow is a child of
    # this one). Outcomes are reported as they finish and returned in input order.
    with ThreadPoolExecutor(document_concurrency(settings)) as pool:
        futures = [pool.submit(copy_context().run, one, document.uri) for document in documents]
        for future in as_completed(futures):
            report.add(future.result())
    summary = publish_run_summary(report, settings, return_state=True)
    if not summary.is_completed():  # the pages are stored either way: only the report is lost
        get_run_logger().warning("the run's summary was not published: %s", summary.message)
    order = {document.uri: index for index, document in enumerate(documents)}
    outcomes = sorted(report.outcomes, key=lambda outcome: order[outcome.source])
    return [outcome.to_dict() for outcome in outcomes]


if __name__ == "__main__":
    print(ingest([str(Path(__file__).resolve().parents[1] / "samples")]))
