"""The `ocrflow` command line.

Prefect, PyMuPDF, torch and the engines are imported inside the commands that use them:
together they take seconds to import, and `--help`, `show` and `stats` need none of them.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from flows.export_commands import export_command, search_command
from flows.service_commands import (
    events_app,
    gpu_worker_command,
    gpu_workers_command,
    pools_app,
    serve_command,
    watch_command,
)
from flows.terminal import configure_logging, console, log, reclaim_logging, report_failures
from infra.settings import RoutingPolicy, Settings
from infra.vocabulary import Mode

if TYPE_CHECKING:
    from rich.progress import Progress

app = typer.Typer(
    help="ocrflow: documents in, routed DeepSeek-OCR pages out, results in Postgres.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",  # docstrings reflowed: their line breaks are not the help's
)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@app.callback()
def main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Also show INFO logs, Prefect's run logs and tracebacks."
        ),
    ] = False,
) -> None:
    """ocrflow: documents in, routed DeepSeek-OCR pages out, results in Postgres."""
    # Quiet by default: every task run logs at INFO, which buries the progress bar and the
    # result; warnings and errors still show, one line each.
    configure_logging(verbose)


SUCCESS_STATUSES = frozenset({"done", "skipped"})


def exit_for(outcomes: list[dict]) -> None:
    """0 when every document ended done or skipped, 1 when any failed or stayed incomplete."""
    if any(outcome["status"] not in SUCCESS_STATUSES for outcome in outcomes):
        raise typer.Exit(1)


def progress_bar(label: str, *, transient: bool) -> Progress:
    """A bar on the shared console, which the log handler also writes to (lines go above it)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
    from tasks.pages import prime_cpu_worker
    from tasks.parallel import warm_up

    # The CPU workers start (and load their models) while Prefect is imported and creates the
    # run, seconds the first pages would otherwise wait for; the flow finds them running.
    warm_up(prime_cpu_worker, Settings())
    log.info("CPU workers starting")
    importing = time.perf_counter()
    from flows.ingest import ingest as ingest_flow
    from flows.reporting import progress_callback

    reclaim_logging()  # importing Prefect installed its own console handler
    log.info("ingest flow imported in %.1f s", time.perf_counter() - importing)
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
        log.warning("no documents found in %s", ", ".join(paths))
    report_failures(outcomes, SUCCESS_STATUSES)
    if json_output:
        typer.echo(json.dumps(outcomes, indent=2))
    elif outcomes:
        table = Table("id", "source", "status", "pages", "note")
        for outcome in outcomes:
            table.add_row(
                str(outcome["id"]),
                Text(outcome["source"]),  # plain: paths and errors may hold [brackets]
                outcome["status"],
                str(outcome["pages"] if outcome["pages"] is not None else ""),
                Text(_note(outcome)),
            )
        Console().print(table)
        _print_stats(_stats(Settings(), [o["id"] for o in outcomes if o["id"] is not None]))
        _print_totals(outcomes)
    if not outcomes:  # a path with no documents in it is a mistake, not a success
        raise typer.Exit(1)
    exit_for(outcomes)


def _note(outcome: dict[str, Any]) -> str:
    """The error, or for a skipped duplicate the document whose content it is."""
    original = outcome.get("duplicate_of")
    if original is None:
        return outcome["error"] or ""
    if original["source"] == outcome["source"]:
        return f"already done as document {original['id']}"
    return f"same content as document {original['id']} ({original['source']})"


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

    reclaim_logging()

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
    report_failures(outcomes, frozenset({"done"}))
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
                Text(outcome["error"] or ""),
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
    """Print a document's pages as markdown or JSON.

    A document that is not done is said so, with its reason, on stderr; a failed one exits 1.
    """
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
        console.print(Text(f"document {doc_id} is {view['status']}: {reason}"))
    if view["status"] == "failed":
        raise typer.Exit(1)


@app.command()
def stats(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    gpu_hour_usd: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Price of one GPU hour in USD for the cost report "
            "(default: OCRFLOW_GPU_HOUR_USD, else 3.00).",
        ),
    ] = None,
) -> None:
    """Counts of documents and pages by status, route and mode, token totals, and the cost
    report: GPU seconds, pages per GPU hour, USD per million pages, vision tokens saved."""
    settings = Settings() if gpu_hour_usd is None else Settings(gpu_hour_usd=gpu_hour_usd)
    result = _stats(settings, None)
    if json_output:
        typer.echo(json.dumps(result, indent=2))
    else:
        _print_stats(result)


def _stats(settings: Settings, document_ids: list[int] | None) -> dict:
    from infra.db.session import session_scope
    from infra.db.stats import CostBasis, collect_stats

    with session_scope(settings.database_url) as session:
        return collect_stats(
            session=session,
            document_ids=document_ids,
            cost_basis=CostBasis.from_settings(settings),
        )


# A run's pages get a table of their own up to this many; a larger run's would bury the totals.
PAGE_TABLE_LIMIT = 50


def _print_stats(result: dict[str, Any]) -> None:
    """Every count `collect_stats` returns, nested groups flattened into `what` labels; the
    pages one row each (a short run's); then the cost report as sentences (its nested figures
    read badly as table rows)."""
    from infra.db.stats import cost_lines

    counts = {k: v for k, v in result.items() if k not in ("cost", "by_page")}
    table = Table("what", "key", "count")
    for what, key, value in _stat_rows(counts):
        table.add_row(what, key, str(value))
    console_out = Console()
    console_out.print(table)
    pages = result.get("by_page")
    if pages and len(pages) <= PAGE_TABLE_LIMIT:
        console_out.print(_page_table(pages))
    elif pages:
        console_out.print(
            f"{len(pages)} pages: per-page figures with `ocrflow show DOC_ID --format json`"
        )
    if "cost" in result:
        for line in cost_lines(result["cost"]):
            console_out.print(Text(line), soft_wrap=True)


def _page_table(pages: list[dict[str, Any]]) -> Table:
    """Fits 80 columns (the width of a pipe or CI log): no box lines, names kept whole."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for name in ("doc", "page", "status", "route", "mode", "engine"):
        table.add_column(name, no_wrap=True)
    for name in ("vision\ntokens", "output\ntokens", "attempts"):
        table.add_column(name, justify="right")
    for page in pages:
        cells = (
            page["document_id"],
            page["page"],
            page["status"],
            page["route"],
            page["mode"],
            page["engine"],
            page["planned_vision_tokens"],
            page["output_tokens"],
            page["attempts"],
        )
        table.add_row(*("" if cell is None else str(cell) for cell in cells))
    return table


def _stat_rows(value: Any, what: str = "") -> list[tuple[str, str, Any]]:
    rows: list[tuple[str, str, Any]] = []
    for key, item in value.items():
        label = key.replace("_", " ")
        if isinstance(item, dict):
            rows += _stat_rows(item, f"{what} {label}".strip())
        else:
            rows.append((what or label, key, item))
    return rows


@app.command("plan")
def plan(
    paths: Annotated[list[str], typer.Argument(help="Files, directories or s3:// URIs.")],
    policy: Annotated[
        RoutingPolicy | None,
        typer.Option(help="auto: keep trustworthy text layers; always-ocr: OCR every page."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print a JSON array, one object per document.")
    ] = False,
) -> None:
    """Dry-run routing: per page the route, mode, token estimate, expected precision and why."""
    from flows.plan import plan_documents, print_plans

    reclaim_logging()  # PyMuPDF is imported now: its messages go to the log, not stdout
    plans = plan_documents(paths, Settings(), policy)
    if not plans:
        log.warning("no documents found in %s", ", ".join(paths))
    if json_output:
        typer.echo(json.dumps([p.to_dict() for p in plans], indent=2, ensure_ascii=False))
    else:
        print_plans(plans, Console())
    if not plans:
        raise typer.Exit(1)


app.add_typer(events_app, name="events")
app.command("watch")(watch_command)
app.command("serve")(serve_command)
app.command("gpu-worker")(gpu_worker_command)
app.command("gpu-workers")(gpu_workers_command)
app.add_typer(pools_app, name="pools")
app.command("export")(export_command)
app.command("search")(search_command)

if __name__ == "__main__":
    app()
