"""What a run shows while it goes and when it ends: Prefect artifacts, and the CLI's progress bar.

The CLI installs a progress callback through a context variable, so the flow itself stays free
of terminal code and a run from the Prefect UI simply has no callback.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from infra.db.session import session_scope
from infra.db.stats import collect_stats, document_failures
from infra.settings import Settings


@dataclass
class DocumentOutcome:
    """What `ingest --json` prints per input document."""

    source: str
    id: int | None
    status: str  # done | failed | incomplete | skipped
    pages: int | None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


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
        """A table of documents, pages by route/mode/status, and failures with reasons."""
        ids = [o.id for o in self.outcomes if o.id is not None]
        with session_scope(settings.database_url) as session:
            stats = collect_stats(session=session, document_ids=ids)
            failures = document_failures(session=session, document_ids=ids)
        rows = [{"what": "documents", "key": k, "count": v} for k, v in stats["documents"].items()]
        for group in ("by_status", "by_route", "by_mode"):
            rows += [
                {"what": f"pages {group.replace('_', ' ')}", "key": k, "count": v}
                for k, v in stats["pages"][group].items()
            ]
        create_table_artifact(table=rows, key="ingest-summary", description="Pages and documents")
        if failures:
            lines = ["| source | reason |", "| --- | --- |"]
            lines += [f"| {source} | {error} |" for source, error in failures]
            create_markdown_artifact(
                markdown="\n".join(lines), key="ingest-failures", description="Failed documents"
            )
        return stats
