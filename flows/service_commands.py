"""The commands that start ocrflow's long-running services: the S3 sweep, the served
deployments and their work pools, GPU workers and the S3 event intake.

The services themselves live in `services/` and the flows in `flows/`; these are their
command-line faces. Each imports what it runs (Prefect, boto3, torch) only when it runs, so
`ocrflow --help` and the quick commands do not pay for them.
"""

from __future__ import annotations

import json
import signal
import time
from typing import TYPE_CHECKING, Annotated

import typer

from flows.terminal import reclaim_logging
from infra.prefect_env import CPU_POOL, DEFAULT_DEBOUNCE_SECONDS, DEFAULT_WATCH_CRON, GPU_POOL
from infra.settings import EngineChoice, RoutingPolicy, Settings
from infra.vocabulary import Mode

if TYPE_CHECKING:
    from services.event_intake import EventIntake


def watch_command(
    prefixes: Annotated[list[str], typer.Argument(help="s3://bucket/prefix to watch.")],
    once: Annotated[bool, typer.Option("--once", help="Sweep once and exit.")] = False,
    interval: Annotated[int, typer.Option(help="Seconds between sweeps.")] = 300,
    process: Annotated[bool, typer.Option(help="Process what is pending.")] = True,
    policy: Annotated[RoutingPolicy | None, typer.Option(help="Routing policy.")] = None,
    mode: Annotated[Mode | None, typer.Option(help="Force one OCR mode.")] = None,
    page_size: Annotated[
        int | None, typer.Option(help="Objects per listing request (default: the most S3 gives).")
    ] = None,
    max_pages: Annotated[
        int | None, typer.Option(help="Listing pages per sweep; the next sweep resumes.")
    ] = None,
) -> None:
    """Sweep S3 prefixes: register what events missed, mark deletions, process what is new.

    Prints one JSON document per sweep. With --once, exits 0 when every prefix was swept and
    every object processed ended done, 1 when a sweep failed or an object failed or was left
    for a retry (run it again: the retry happens then).
    """
    from flows.watch import watch, watch_succeeded

    reclaim_logging()
    listing = {"page_size": page_size} if page_size else {}
    while True:
        try:
            result = watch(prefixes, process, policy, mode, max_pages=max_pages, **listing)
        except Exception as exc:  # the database away, say: report it like any other outcome
            result = {"error": f"{type(exc).__name__}: {exc}", "sweeps": [], "processed": {}}
        typer.echo(json.dumps(result))
        if once:
            if "error" in result or not watch_succeeded(result):
                raise typer.Exit(1)
            return
        time.sleep(interval)


def serve_command(
    watch_prefixes: Annotated[
        list[str] | None,
        typer.Option("--watch", help="s3:// prefix the scheduled sweep lists (repeatable)."),
    ] = None,
    cron: Annotated[str, typer.Option(help="Sweep schedule (cron).")] = DEFAULT_WATCH_CRON,
    debounce: Annotated[
        int, typer.Option(help="Seconds one event run absorbs a burst.")
    ] = DEFAULT_DEBOUNCE_SECONDS,
    limit: Annotated[int | None, typer.Option(help="Concurrent flow runs at most.")] = None,
) -> None:
    """Serve the ingest, watch, S3-event and redrive deployments from this process (no pool)."""
    from datetime import timedelta

    from prefect import serve

    from flows.deployments import build_deployments

    reclaim_logging()
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
    import asyncio

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


def gpu_worker_command(
    device: Annotated[str, typer.Option(help="Device of this worker: cuda:N, or cpu.")] = "cuda:0",
    engine: Annotated[
        EngineChoice | None, typer.Option(help="Engine to keep resident (default: setting).")
    ] = None,
    max_batch: Annotated[
        int | None,
        typer.Option(help="Pages decoded at once (default: as many as free memory holds)."),
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="Drain the queue, then exit.")] = False,
) -> None:
    """Serve the GPU work queue with a resident model on one device."""
    import logging

    from services.gpu_worker import run_worker

    # A service: its progress (claims, batch sizes, reclaimed leases) is what an operator
    # watches, so it logs at INFO with timestamps whatever --verbose says.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    settings = Settings(**({"engine": engine} if engine else {}))
    done = run_worker(settings, device=device, max_batch=max_batch, once=once)
    typer.echo(f"{done} pages answered")


def gpu_workers_command(
    devices: Annotated[str, typer.Option(help="Comma-separated devices, one worker each.")],
    engine: Annotated[EngineChoice | None, typer.Option(help="Engine to keep resident.")] = None,
    max_batch: Annotated[int | None, typer.Option(help="Pages decoded at once per GPU.")] = None,
    once: Annotated[bool, typer.Option("--once", help="Drain the queue, then exit.")] = False,
) -> None:
    """One `gpu-worker` process per device on this host; SIGTERM is passed on to each."""
    from services.gpu_worker import spawn_workers

    processes = spawn_workers(
        [d.strip() for d in devices.split(",") if d.strip()],
        engine=engine,
        max_batch=max_batch,
        once=once,
    )
    forward = lambda signum, _frame: [p.send_signal(signum) for p in processes]  # noqa: E731
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [process.wait() for process in processes]
    if any(codes):
        raise typer.Exit(max(codes))


# S3 event intake ----------------------------------------------------------------------------

SQS_RETRY_SECONDS = 10  # between receives while SQS cannot be reached

events_app = typer.Typer(
    help="Receive S3 event notifications (SQS or HTTP) and turn them into ingestion.",
    no_args_is_help=True,
)


@events_app.command("sqs")
def sqs_command(
    queue_url: Annotated[str, typer.Argument(help="The SQS queue S3 (or SNS) notifies.")],
    wait: Annotated[int, typer.Option(help="Long-poll seconds per receive.")] = 20,
    once: Annotated[bool, typer.Option("--once", help="Poll once and exit.")] = False,
) -> None:
    """Poll an SQS queue of S3 notifications (direct, via SNS or via EventBridge)."""
    from dataclasses import asdict

    from infra.errors import is_infrastructure
    from services.event_intake import EventIntake, poll_sqs_once

    intake = EventIntake(Settings(), source="sqs")
    _prepare(intake)
    typer.echo(f"polling {queue_url}", err=True)
    while True:
        try:
            poll_sqs_once(intake, queue_url, wait_seconds=wait)
        except Exception as exc:  # SQS itself away: keep polling, the messages wait in the queue
            if once or not is_infrastructure(exc):
                raise
            typer.echo(f"SQS unreachable ({type(exc).__name__}: {exc}); retrying", err=True)
            time.sleep(SQS_RETRY_SECONDS)
        if once:
            typer.echo(json.dumps(asdict(intake.counts)))
            return


@events_app.command("serve")
def serve_receiver_command(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
) -> None:
    """Receive S3 notifications over HTTP (MinIO webhooks, SNS HTTP subscriptions)."""
    from services.event_intake import EventIntake, make_receiver

    intake = EventIntake(Settings(), source="http")
    _prepare(intake)
    server = make_receiver(intake, host, port)
    typer.echo(f"receiving S3 notifications on http://{host}:{server.server_port}/", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _prepare(intake: EventIntake) -> None:
    """Schema first (as `ingest` does); a database that is away now only delays it: every
    notification tries again, and is answered 503 / left in SQS until it works."""
    reclaim_logging()
    try:
        intake.ensure_schema()
    except Exception as exc:
        typer.echo(f"database not ready ({type(exc).__name__}); retrying per event", err=True)
    _warn_without_prefect_api()


def _warn_without_prefect_api() -> None:
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        typer.echo(
            "PREFECT_API_URL is not set: objects are registered, but no deployment trigger will "
            "see the events (a sweep still processes them).",
            err=True,
        )
