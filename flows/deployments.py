"""Deployments: ingest, the S3 sweep and S3-event ingestion, served locally or on work pools.

    ocrflow serve --watch s3://archive/incoming/     # all three, in this process
    ocrflow pools create                             # a CPU pool and a GPU pool for workers

`infra/deploy/prefect.yaml` declares the same deployments on the pools for `prefect deploy`.
Their command-line faces (`serve`, `pools create`) live in `flows/service_commands.py`.
"""

from __future__ import annotations

from datetime import timedelta

from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger

from flows.ingest import ingest
from flows.redrive import redrive
from flows.s3_ingest import ingest_s3_objects
from flows.watch import SWEEP_REGISTERED_EVENT, watch
from infra.prefect_env import CPU_POOL, DEFAULT_DEBOUNCE_SECONDS, DEFAULT_WATCH_CRON, GPU_POOL
from services.event_intake import BUCKET_LABEL, EVENT_PREFIX

__all__ = ["CPU_POOL", "GPU_POOL", "build_deployments", "s3_changes_trigger"]

DEFAULT_DEBOUNCE = timedelta(seconds=DEFAULT_DEBOUNCE_SECONDS)


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
