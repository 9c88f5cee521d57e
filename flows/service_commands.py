"""The commands that start ocrflow's long-running services: GPU workers and the S3 event intake.

The services themselves live in `services/`; these are their command-line faces.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import asdict
from typing import Annotated

import typer

from infra.errors import is_infrastructure
from infra.settings import EngineChoice, Settings
from services.event_intake import EventIntake, make_receiver, poll_sqs_once
from services.gpu_worker import run_worker, spawn_workers


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
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


# CLI -------------------------------------------------------------------------------------

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
