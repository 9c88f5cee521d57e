"""Deployments: ingest, the S3 sweep and S3-event ingestion, served locally or on work pools.

    ocrflow serve --watch s3://archive/incoming/     # all three, in this process
    ocrflow pools create                             # a CPU pool and a GPU pool for workers

`infra/deploy/prefect.yaml` declares the same deployments on the pools for `prefect deploy`.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Annotated

import typer
from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger

from flows.ingest import ingest
from flows.redrive import redrive
from flows.s3_ingest import ingest_s3_objects
from flows.watch import SWEEP_REGISTERED_EVENT, watch
from services.event_intake import BUCKET_LABEL, EVENT_PREFIX

CPU_POOL = "ocrflow-cpu"  # sweeps and event intake: S3 listing and database work
GPU_POOL = "ocrflow-gpu"  # anything that OCRs: the model stays resident in the worker
DEFAULT_DEBOUNCE = timedelta(seconds=60)
DEFAULT_WATCH_CRON = "*/15 * * * *"


def s3_changes_trigger(debounce: timedelta = DEFAULT_DEBOUNCE) -> DeploymentEventTrigger:
    """Runs S3 ingestion once per burst of new objects, per bucket.

    Reactive with `within`: the first event fires, later ones in the window are absorbed. The
    run is scheduled after the window, and every change was registered before its event was
    emitted, so that one run finds the whole burst in the registry. Buckets debounce apart
    (`for_each`), and each run processes its own bucket.
    """
    return DeploymentEventTrigger(
        name="s3-objects-changed",
        expect={f"{EVENT_PREFIX}.created", SWEEP_REGISTERED_EVENT},
        match={"prefect.resource.id": "s3://*"},
        for_each={BUCKET_LABEL},
        threshold=1,
        within=debounce,
        schedule_after=debounce,
        parameters={"bucket": f"{{{{ event.resource['{BUCKET_LABEL}'] }}}}"},
    )


def build_deployments(
    watch_prefixes: list[str],
    watch_cron: str = DEFAULT_WATCH_CRON,
    debounce: timedelta = DEFAULT_DEBOUNCE,
) -> list[RunnerDeployment]:
    """The deployments; the sweep is scheduled only when it has prefixes to watch."""
    return [
        ingest.to_deployment(
            name="ingest",
            tags=["ocrflow"],
            description="Ingest files, folders or s3:// prefixes (source URIs, policy, mode).",
        ),
        watch.to_deployment(
            name="watch",
            tags=["ocrflow", "s3"],
            cron=watch_cron if watch_prefixes else None,
            parameters={"prefixes": watch_prefixes},
            description="Sweep S3 prefixes: register what events missed, then process it.",
        ),
        ingest_s3_objects.to_deployment(
            name="s3-events",
            tags=["ocrflow", "s3"],
            triggers=[s3_changes_trigger(debounce)],
            description="Process registered S3 objects; triggered by S3 events, debounced.",
        ),
        redrive.to_deployment(
            name="redrive",
            tags=["ocrflow"],
            description="Re-run failed (or needs-review) pages and resume unfinished documents.",
        ),
    ]


def serve_command(
    watch_prefixes: Annotated[
        list[str] | None,
        typer.Option("--watch", help="s3:// prefix the scheduled sweep lists (repeatable)."),
    ] = None,
    cron: Annotated[str, typer.Option(help="Sweep schedule (cron).")] = DEFAULT_WATCH_CRON,
    debounce: Annotated[int, typer.Option(help="Seconds one event run absorbs a burst.")] = 60,
    limit: Annotated[int | None, typer.Option(help="Concurrent flow runs at most.")] = None,
) -> None:
    """Serve the ingest, watch, S3-event and redrive deployments from this process (no pool)."""
    serve(
        *build_deployments(watch_prefixes or [], cron, timedelta(seconds=debounce)),
        limit=limit,
    )


pools_app = typer.Typer(help="Prefect work pools for ocrflow workers.", no_args_is_help=True)


@pools_app.command("create")
def create_pools_command(
    pool_type: Annotated[
        str, typer.Option("--type", help="Worker type of both pools.")
    ] = "process",
    gpu_slots: Annotated[int, typer.Option(help="Concurrent runs on the GPU pool.")] = 1,
) -> None:
    """Create the CPU pool and the separate GPU pool (idempotent), and say how to start workers."""
    for name, limit in ((CPU_POOL, None), (GPU_POOL, gpu_slots)):
        created = asyncio.run(_ensure_pool(name, pool_type, limit))
        typer.echo(f"{name}: {'created' if created else 'exists'} ({pool_type}, limit {limit})")
    typer.echo(f"start workers: prefect worker start --pool {CPU_POOL}")
    typer.echo(f"               prefect worker start --pool {GPU_POOL}   # on the GPU machine")


async def _ensure_pool(name: str, pool_type: str, concurrency_limit: int | None) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    async with get_client() as client:
        try:
            await client.create_work_pool(
                WorkPoolCreate(name=name, type=pool_type, concurrency_limit=concurrency_limit)
            )
        except ObjectAlreadyExists:
            return False
    return True
