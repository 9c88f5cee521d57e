"""The `ocrflow` command line."""

from __future__ import annotations

import json
import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flows.deployments import pools_app, serve_command
from flows.plan import plan_command
from flows.service_commands import events_app, gpu_worker_command, gpu_workers_command
from flows.watch import watch_command
from infra.settings import RoutingPolicy, Settings
from infra.vocabulary import Mode

app = typer.Typer(
    help="ocrflow: documents in, routed DeepSeek-OCR pages out, results in Postgres.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)
app.add_typer(db_app, name="db")
console = Console(stderr=True)


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Prefect's flow and task run logs.")
    ] = False,
) -> None:
    """ocrflow: documents in, routed DeepSeek-OCR pages out, results in Postgres."""
    # Quiet by default: every task run logs at INFO, which buries the progress bar and the
    # result; warnings and errors still show.
    level = logging.INFO if verbose else logging.WARNING
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).setLevel(level)


SUCCESS_STATUSES = frozenset({"done", "skipped"})


def exit_for(outcomes: list[dict]) -> None:
    """0 when every document ended done or skipped, 1 when any failed or stayed incomplete."""
    if any(outcome["status"] not in SUCCESS_STATUSES for outcome in outcomes):
        raise typer.Exit(1)


def progress_bar(label: str, *, transient: bool) -> Progress:
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
    )


@app.command()
def ingest(
    paths: Annotated[list[str], typer.Argument(help="Files, directories or s3:// URIs.")],
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per document.")
    ] = False,
    policy: Annotated[
        RoutingPolicy | None, typer.Option(help="Routing policy for this run.")
    ] = None,
    mode: Annotated[
        Mode | None, typer.Option(help="Force one DeepSeek-OCR mode for every OCR page.")
    ] = None,
) -> None:
    """Ingest documents: split, route, OCR and store every page.

    Exits 0 when every document ended done or skipped, 1 when any failed or was left
    incomplete (pages retrying: run it again, or `ocrflow redrive`).
    """
    from flows.ingest import ingest as ingest_flow
    from flows.reporting import progress_callback

    with progress_bar("ingest", transient=json_output) as progress:
        bar = progress.add_task("", total=None)

        def advance(outcome, total: int) -> None:
            progress.update(
                bar,
                total=total,
                advance=1,
                description=f"{Path(outcome.source).name}: {outcome.status}",
            )

        token = progress_callback.set(advance)
        try:
            outcomes = ingest_flow(paths, policy=policy, mode=mode)
        finally:
            progress_callback.reset(token)
    if not outcomes:
        console.print(f"[yellow]no documents found in {', '.join(paths)}[/yellow]")
    if json_output:
        typer.echo(json.dumps(outcomes, indent=2))
    elif outcomes:
        table = Table("id", "source", "status", "pages", "error")
        for outcome in outcomes:
            table.add_row(
                str(outcome["id"]),
                outcome["source"],
                outcome["status"],
                str(outcome["pages"] or ""),
                outcome["error"] or "",
            )
        Console().print(table)
        _print_stats(_stats(Settings(), [o["id"] for o in outcomes if o["id"] is not None]))
        _print_totals(outcomes)
    if not outcomes:  # a path with no documents in it is a mistake, not a success
        raise typer.Exit(1)
    exit_for(outcomes)


def _print_totals(outcomes: list[dict]) -> None:
    by_status: dict[str, int] = {}
    for outcome in outcomes:
        by_status[outcome["status"]] = by_status.get(outcome["status"], 0) + 1
    counts = ", ".join(f"{count} {status}" for status, count in sorted(by_status.items()))
    console.print(f"{len(outcomes)} documents: {counts or 'none'}")


@app.command()
def redrive(
    doc_ids: Annotated[
        list[int] | None,
        typer.Argument(help="Documents to redrive (default: every document that needs it)."),
    ] = None,
    status: Annotated[
        str,
        typer.Option(
            help="Comma-separated page statuses to re-run: failed, needs_review, done. "
            "Pending and retrying pages are always worked."
        ),
    ] = "failed",
    mode: Annotated[
        Mode | None, typer.Option(help="Force one DeepSeek-OCR mode for every OCR page.")
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per document.")
    ] = False,
) -> None:
    """Re-run failed (or other) pages through the configured engine, and resume documents
    left incomplete or whose run died.

    Exits 0 when every redriven document ended done, 1 otherwise.
    """
    from flows.redrive import REDRIVE_STATUSES
    from flows.redrive import redrive as redrive_flow

    statuses = [s.strip() for s in status.split(",") if s.strip()]
    unknown = sorted(set(statuses) - REDRIVE_STATUSES)
    if unknown or not statuses:
        raise typer.BadParameter(
            f"unknown status {', '.join(unknown) or '(none)'}; choose from "
            + ", ".join(sorted(REDRIVE_STATUSES)),
            param_hint="--status",
        )
    with progress_bar("redrive", transient=True) as progress:
        progress.add_task("", total=None)
        outcomes = redrive_flow(doc_ids or None, statuses, mode)
    if json_output:
        typer.echo(json.dumps(outcomes, indent=2))
    else:
        table = Table("id", "status", "pages", "redriven", "error")
        for outcome in outcomes:
            table.add_row(
                str(outcome["id"]),
                outcome["status"],
                str(outcome["pages"] or ""),
                str(outcome["redriven"]),
                outcome["error"] or "",
            )
        Console().print(table)
        _print_totals(outcomes)
    exit_for(outcomes)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply database migrations (OCRFLOW_DATABASE_URL)."""
    from infra.db.migrate import current_revision, upgrade

    url = Settings().database_url
    upgrade(url)
    console.print(f"database at revision {current_revision(url)}")


class ShowFormat(StrEnum):
    MD = "md"
    JSON = "json"


@app.command()
def show(
    doc_id: Annotated[int, typer.Argument(help="Document id (from `ingest`).")],
    format: Annotated[ShowFormat, typer.Option("--format", help="md or json.")] = ShowFormat.MD,
) -> None:
    """Print a document's pages as markdown or JSON."""
    from infra.db.queries import document_markdown, document_view
    from infra.db.session import session_scope

    with session_scope(Settings().database_url) as session:
        view = document_view(session=session, document_id=doc_id)
    if view is None:
        console.print(f"no document with id {doc_id}")
        raise typer.Exit(1)
    if format is ShowFormat.JSON:
        typer.echo(json.dumps(view, indent=2, default=str))
    elif view["pages"]:
        typer.echo(document_markdown(view))
    if view["status"] != "done":
        reason = view["error"] or "no reason recorded"
        console.print(f"document {doc_id} is {view['status']}: {reason}")
    if not view["pages"] and view["status"] == "failed":
        raise typer.Exit(1)  # nothing to show: the file itself could not be read


@app.command()
def stats(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Counts of documents and pages by status, route and mode, and token totals."""
    result = _stats(Settings(), None)
    if json_output:
        typer.echo(json.dumps(result, indent=2))
    else:
        _print_stats(result)


def _stats(settings: Settings, document_ids: list[int] | None) -> dict:
    from infra.db.session import session_scope
    from infra.db.stats import collect_stats

    with session_scope(settings.database_url) as session:
        return collect_stats(session=session, document_ids=document_ids)


def _print_stats(result: dict) -> None:
    table = Table("what", "key", "count")
    for status, count in result["documents"].items():
        table.add_row("documents", status, str(count))
    for group in ("by_status", "by_route", "by_mode"):
        for key, count in result["pages"][group].items():
            table.add_row(f"pages {group.replace('_', ' ')}", key, str(count))
    for key, value in result["tokens"].items():
        table.add_row("tokens", key, str(value))
    Console().print(table)


app.command("plan")(plan_command)
app.add_typer(events_app, name="events")
app.command("watch")(watch_command)
app.command("serve")(serve_command)
app.command("gpu-worker")(gpu_worker_command)
app.command("gpu-workers")(gpu_workers_command)
app.add_typer(pools_app, name="pools")

if __name__ == "__main__":
    app()
