"""`ocrflow export` and `ocrflow search`: read stored results; no Prefect, no server.

Registered in `flows/cli.py`; heavy imports (PyMuPDF, boto3) happen inside the commands.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.terminal import console, route_mupdf_messages
from infra.settings import Settings
from tasks.exports.formats import ExportFormat


def export_command(
    doc_ids: Annotated[list[int], typer.Argument(help="Documents to export (ids from `ingest`).")],
    formats: Annotated[
        list[ExportFormat],
        typer.Option(
            "--format",
            "-f",
            help="pdf (searchable: the original pages with an invisible text layer), alto "
            "(ALTO XML v4), md, txt, json, or jsonl (one page per line). Repeat for several.",
        ),
    ] = [ExportFormat.PDF],  # noqa: B006 (typer reads the default, never mutates it)
    out: Annotated[str, typer.Option("--out", "-o", help="A folder, or s3://bucket/prefix.")] = ".",
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON list of the files written.")
    ] = False,
) -> None:
    """Export documents' stored results as files named `document-<id>.<format>`.

    A PDF export needs the source: it must still be the content that was ingested (same
    sha256), else that document fails. Exits 0 when every document was exported, else 1.
    """
    from tasks.exports.writer import export_documents

    route_mupdf_messages()  # MuPDF's complaints about a damaged source must not reach stdout
    written, failures = export_documents(
        database_url=Settings().database_url, document_ids=doc_ids, formats=formats, out=out
    )
    if json_output:
        typer.echo(json.dumps([asdict(file) for file in written], indent=2))
    else:
        for file in written:
            typer.echo(file.path)
    for failure in failures:
        console.print(f"document {failure.document_id} not exported: {failure.error}", markup=False)
    if failures:
        raise typer.Exit(1)


def search_command(
    query: Annotated[str, typer.Argument(help="Words to find; every one must occur on the page.")],
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Most hits to show.")] = 20,
    document: Annotated[
        int | None, typer.Option("--document", "-d", help="Search only this document.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the hits as JSON.")] = False,
) -> None:
    """Search the accepted text of every page, best hits first.

    Exits 0 when something was found, 1 when nothing was.
    """
    from infra.db.migrate import ensure_schema
    from infra.db.search import MARK_CLOSE, MARK_OPEN, search_pages
    from infra.db.session import session_scope

    url = Settings().database_url
    ensure_schema(url)  # an older database gets its search index here
    with session_scope(url) as session:
        hits = search_pages(session=session, query=query, limit=limit, document_id=document)
    if json_output:
        typer.echo(json.dumps([asdict(hit) for hit in hits], indent=2, ensure_ascii=False))
    elif hits:
        table = Table("rank", "document", "page", "source", "snippet")
        for hit in hits:
            shown = escape(hit.snippet).replace(MARK_OPEN, "[bold]").replace(MARK_CLOSE, "[/bold]")
            table.add_row(
                f"{hit.rank:.3f}", str(hit.document_id), str(hit.page_no), hit.source, shown
            )
        Console().print(table)
    if not hits:
        console.print(f"nothing found for {query!r}", markup=False)
        raise typer.Exit(1)
