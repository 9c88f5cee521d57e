"""The ingest flows: documents in, routed and recognised pages out, state in our database.

ocrflow ingest samples/          # or: python -m flows.ingest
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.reporting import DocumentOutcome, IngestReport
from infra.db.migrate import ensure_schema
from infra.errors import PermanentInputError
from infra.settings import RoutingPolicy, Settings
from infra.vocabulary import Mode
from tasks.fetch import Source, resolve_sources, staged, unread_identity
from tasks.steps import (
    export_results,
    finish_document,
    persist_pages,
    record_failure,
    register_document,
    route_pages,
    run_ocr_batch,
    split_document,
)


def run_settings(policy: RoutingPolicy | None = None, mode: Mode | None = None) -> Settings:
    """Settings for one run: the environment, with the run's own overrides on top."""
    overrides = {}
    if policy is not None:
        overrides["routing_policy"] = policy
    if mode is not None:
        overrides["mode_override"] = mode
    return Settings(**overrides)


@flow(name="ingest-document", flow_run_name="ingest {source}", log_prints=True)
def ingest_document(
    source: str,
    policy: RoutingPolicy | None = None,
    mode: Mode | None = None,
    etag: str | None = None,
    version_id: str | None = None,
) -> DocumentOutcome:
    """1. fetch  2. register (skip done content)  3. split into windows  4. per window: route,
    OCR batch (validate, escalate), persist  5. finish  6. S3 sources: write results back.

    `etag`/`version_id` pin an S3 source to the registered version (`SourceChanged` otherwise).
    """
    settings = run_settings(policy, mode)
    document_id: int | None = None
    try:
        with staged(Source(source, version_id=version_id, etag=etag), settings) as staged_file:
            claim = register_document(staged_file.identity(), settings)
            document_id = claim.document_id
            if claim.already_done:
                outcome = DocumentOutcome(source, document_id, "skipped", None)
            else:
                windows = split_document(document_id, staged_file.path, settings)
                for page_numbers in windows:
                    plans = route_pages(staged_file.path, page_numbers, settings)
                    records = run_ocr_batch(staged_file.path, plans, settings)
                    persist_pages(document_id, records, settings)
                status = finish_document(document_id, settings)
                outcome = DocumentOutcome(source, document_id, status, sum(map(len, windows)))
            if (s3_object := staged_file.s3_object()) is not None:
                export_results(s3_object, document_id, settings)
            return outcome
    except PermanentInputError as exc:
        if document_id is None:  # rejected before identity (size limit): register it anyway
            document_id = register_document(unread_identity(source), settings).document_id
        record_failure(document_id, str(exc), settings)
        get_run_logger().warning("%s failed: %s", source, exc)
        return DocumentOutcome(source, document_id, "failed", None, str(exc))
    except Exception as exc:
        if document_id is not None:
            record_failure(document_id, f"{type(exc).__name__}: {exc}", settings)
        raise


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
    ensure_schema(settings.database_url)
    documents = resolve_sources(sources)
    report = IngestReport(total=len(documents))
    for document in documents:
        state = ingest_document(document.uri, policy, mode, return_state=True)
        if state.is_completed():
            outcome = state.result()
        else:
            outcome = DocumentOutcome(document.uri, None, "failed", None, state.message)
        report.add(outcome)
    report.publish_summary(settings)
    return [outcome.to_dict() for outcome in report.outcomes]


if __name__ == "__main__":
    from pathlib import Path

    print(ingest([str(Path(__file__).resolve().parents[1] / "samples")]))
