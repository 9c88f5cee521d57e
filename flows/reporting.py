"""What a run shows while it goes and when it ends: Prefect artifacts, and the CLI's progress bar.

The CLI installs a progress callback through a context variable, so the flow itself stays free
of terminal code and a run from the Prefect UI simply has no callback. The run's artifacts list
every document with its id, so a UI user can go from a run to `ocrflow show ID`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from infra.db.models import Document
from infra.db.session import session_scope
from infra.db.stats import CostBasis, collect_stats, cost_lines, document_failures
from infra.settings import Settings


@dataclass
class DocumentOutcome:
    """What `ingest --json` prints per input document.

    A skipped document's content was already done: `id` is that document, and `duplicate_of`
    names it with the source it was first ingested from, so a renamed copy is recognisable.
    """

    source: str
    id: int | None
    status: str  # done | failed | incomplete | skipped
    pages: int | None
    error: str | None = None
    duplicate_of: dict[str, Any] | None = None  # {"id": ..., "source": ...}

    def to_dict(self) -> dict:
        return asdict(self)


def skipped_outcome(source: str, document_id: int, settings: Settings) -> DocumentOutcome:
    """The outcome for content already done as `document_id`, with its page count and origin."""
    with session_scope(settings.database_url) as session:
        document = session.get_one(Document, document_id)
        first_source, pages = document.source_uri, document.page_count
    duplicate_of = {"id": document_id, "source": first_source}
    return DocumentOutcome(source, document_id, "skipped", pages, duplicate_of=duplicate_of)


@dataclass
class RedriveOutcome:
    """What `redrive --json` prints per document."""

    id: int
    status: str  # done | failed | incomplete
    pages: int | None
    redriven: int  # pages this run worked
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


progress_callback: ContextVar[Callable[[DocumentOutcome, int], None] | None] = ContextVar(
    "ocrflow_progress_callback", default=None
)


@dataclass
class IngestReport:
    total: int
    outcomes: list[DocumentOutcome] = field(default_factory=list)
    _artifact_id: object | None = None

    def __post_init__(self) -> None:
        self._artifact_id = create_progress_artifact(
            progress=0.0, key="ingest-progress", description=f"{self.total} documents"
        )

    def add(self, outcome: DocumentOutcome) -> None:
        self.outcomes.append(outcome)
        done = len(self.outcomes)
        update_progress_artifact(self._artifact_id, progress=100.0 * done / max(self.total, 1))
        if (callback := progress_callback.get()) is not None:
            callback(outcome, self.total)

    def publish_summary(self, settings: Settings) -> dict:
        """A table of documents, pages by route/mode/status and the cost report (as
        `ocrflow stats` prints it, for this run's documents), and failures with reasons; and a
        markdown table of every document (id, status, pages by route and mode, tokens)."""
        ids = [o.id for o in self.outcomes if o.id is not None]
        with session_scope(settings.database_url) as session:
            stats = collect_stats(
                session=session, document_ids=ids, cost_basis=CostBasis.from_settings(settings)
            )
            failures = document_failures(session=session, document_ids=ids)
            per_document = {
                i: collect_stats(session=session, document_ids=[i]) for i in dict.fromkeys(ids)
            }
        create_markdown_artifact(
            markdown=documents_markdown(self.outcomes, per_document),
            key="ingest-documents",
            description="Documents of this run: `ocrflow show ID` prints one",
        )
        rows = [{"what": "documents", "key": k, "count": v} for k, v in stats["documents"].items()]
        for group in ("by_status", "by_route", "by_mode"):
            rows += [
                {"what": f"pages {group.replace('_', ' ')}", "key": k, "count": v}
                for k, v in stats["pages"][group].items()
            ]
        rows += cost_rows(stats["cost"])
        create_table_artifact(
            table=rows,
            key="ingest-summary",
            description="Pages and documents; cost of this run's documents:\n\n"
            + "\n".join(f"- {line.strip()}" for line in cost_lines(stats["cost"])),
        )
        if failures:
            lines = ["| source | reason |", "| --- | --- |"]
            lines += [f"| {source} | {error} |" for source, error in failures]
            create_markdown_artifact(
                markdown="\n".join(lines), key="ingest-failures", description="Failed documents"
            )
        return stats


def documents_markdown(outcomes: list[DocumentOutcome], stats: dict[int, dict[str, Any]]) -> str:
    """One row per document: id, status, pages by route and by mode, token totals, and the
    command that prints it. `stats` holds `collect_stats` of each document."""
    lines = [
        "| id | source | status | pages | by route | by mode | tokens | show |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for outcome in outcomes:
        document = stats.get(outcome.id) if outcome.id is not None else None
        pages = document["pages"] if document else {}
        note = outcome.error or ""
        if outcome.duplicate_of is not None:
            note = f"same content as document {outcome.duplicate_of['id']}"
        cells = [
            str(outcome.id) if outcome.id is not None else "-",
            outcome.source,
            f"{outcome.status}{f': {note}' if note else ''}",
            str(outcome.pages if outcome.pages is not None else pages.get("total", "")),
            _counts(pages.get("by_route", {})),
            _counts(pages.get("by_mode", {})),
            _token_totals(document["tokens"] if document else {}),
            f"`ocrflow show {outcome.id}`" if outcome.id is not None else "",
        ]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines)


def cost_rows(cost: dict[str, Any], what: str = "cost") -> list[dict[str, Any]]:
    """The cost report as `ingest-summary` rows: each figure under `what`, nested groups
    (the vision-token saving, its OCR pages alone) under longer labels."""
    rows: list[dict[str, Any]] = []
    for key, value in cost.items():
        if isinstance(value, dict):
            label = "vision tokens" if key.startswith("vision_tokens") else key.replace("_", " ")
            rows += cost_rows(value, f"{what} {label}")
        else:
            rows.append({"what": what, "key": key, "count": value})
    return rows


def _counts(counts: dict[str, int]) -> str:
    # Text-layer and blank pages have no mode: their key is None.
    return ", ".join(f"{key} {n}" for key, n in counts.items() if key != "None" and n)


def _token_totals(tokens: dict[str, Any]) -> str:
    """Every `*_tokens` total, whatever the stats module counts (`attempts_with_tokens` is a
    count of attempts, not of tokens)."""
    return ", ".join(
        f"{key.removesuffix('_tokens')} {value}"
        for key, value in tokens.items()
        if key.endswith("_tokens")
        and not key.startswith("attempts")
        and isinstance(value, int)
        and not isinstance(value, bool)
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
