"""The sweep: list watched S3 prefixes and catch what events missed.

Events get lost (a queue purged, a receiver down, a notification misconfigured); the sweep makes
delivery complete. It registers every content version the registry has not seen, marks versions
gone from the bucket as deleted (their results stay), and processes what is pending.

    ocrflow watch s3://archive/incoming/ --once

A prefix that cannot be listed (S3 throttling or away, after retries) is reported and the
others go on; a key that can never be registered is skipped and listed in the summary. The
command itself (`ocrflow watch`) is in `flows/service_commands.py`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from flows.ingest import run_settings
from flows.s3_ingest import ingest_s3_objects
from infra.db.migrate import ensure_schema
from infra.errors import is_infrastructure
from infra.s3 import parse_s3_uri
from infra.settings import RoutingPolicy, Settings
from infra.vocabulary import Mode
from services.event_intake import BUCKET_LABEL
from tasks.s3_reconcile import SweepSummary, sweep_prefix
from tasks.s3_source import LIST_PAGE_SIZE

SWEEP_REGISTERED_EVENT = "ocrflow.s3.sweep.registered"
SETTLED_OUTCOMES = frozenset({"done", "gone"})  # gone: deleted before anyone processed it


def _retry_outage(_task, _run, state) -> bool:
    try:
        state.result()
    except Exception as exc:
        return is_infrastructure(exc)
    return False


@task(
    cache_policy=NO_CACHE,
    task_run_name="sweep {uri}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_retry_outage,  # throttled or S3 away; a retry resumes at the cursor
)
def sweep(uri: str, settings: Settings, page_size: int, max_pages: int | None) -> SweepSummary:
    return sweep_prefix(uri, settings, page_size=page_size, max_pages=max_pages)


@flow(name="watch", log_prints=True)
def watch(
    prefixes: list[str],
    process: bool = True,
    policy: RoutingPolicy | None = None,
    mode: Mode | None = None,
    page_size: int = LIST_PAGE_SIZE,
    max_pages: int | None = None,
) -> dict[str, Any]:
    """1. list each prefix (resuming an interrupted pass) and register unseen versions, marking
    deleted ones  2. process what is pending in the swept buckets.

    Args:
        prefixes: s3:// prefixes to sweep, e.g. `s3://archive/incoming/`.
        process: also process what is pending here; off, the sweep only registers and emits
            `ocrflow.s3.sweep.registered`, which triggers `ingest-s3-objects` (on the GPU pool).
        policy: `auto` keeps trustworthy text layers; `always-ocr` OCRs every non-blank page.
        mode: force one DeepSeek-OCR mode for every OCR page.
        page_size: objects per listing request (S3 returns at most 1,000).
        max_pages: stop each sweep after this many pages; the next run resumes there.
    """
    settings = run_settings(policy, mode)
    ensure_schema(settings.database_url)
    states = [sweep(uri, settings, page_size, max_pages, return_state=True) for uri in prefixes]
    sweeps = [
        asdict(state.result()) if state.is_completed() else {"uri": uri, "error": state.message}
        for uri, state in zip(prefixes, states, strict=True)
    ]
    if process:
        buckets = dict.fromkeys(parse_s3_uri(uri).bucket for uri in prefixes)
        processed = {bucket: ingest_s3_objects(policy, mode, bucket) for bucket in buckets}
    else:
        processed = {}
        announce_registered([state.result() for state in states if state.is_completed()])
    return {"sweeps": sweeps, "processed": processed}


def watch_succeeded(result: dict[str, Any]) -> bool:
    """Every prefix was swept and every object processed ended done (or was gone)."""
    swept = all("error" not in summary for summary in result["sweeps"])
    settled = all(
        outcome in SETTLED_OUTCOMES
        for outcomes in result["processed"].values()
        for outcome, count in outcomes.items()
        if count
    )
    return swept and settled


def announce_registered(sweeps: list[SweepSummary]) -> None:
    """Tells the S3 ingestion trigger (on the GPU pool) that a sweep found new versions."""
    for summary in sweeps:
        if summary.registered:
            emit_event(
                event=SWEEP_REGISTERED_EVENT,
                resource={
                    "prefect.resource.id": summary.uri,
                    BUCKET_LABEL: parse_s3_uri(summary.uri).bucket,
                },
                payload=asdict(summary),
            )
