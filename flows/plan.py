"""`ocrflow plan`: a dry run of routing. Every page's route, mode, estimate and reason, and what
the routed document costs in vision tokens against giving every page Gundam.

Nothing is stored and no OCR runs; a document that cannot be opened is reported with its error
and the others continue. The command (`ocrflow plan`) is in `flows/cli.py`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from infra.errors import PermanentInputError
from infra.settings import RoutingPolicy, Settings
from infra.vocabulary import Mode
from models.registry import engine_capabilities
from tasks.features import extract_page_features
from tasks.fetch import Source, resolve_sources, staged
from tasks.routing import route_page
from tasks.split import open_document


@dataclass(frozen=True)
class PagePlan:
    """One page's routing decision, as `plan --json` prints it."""

    page_no: int
    route: str
    mode: str | None
    est_text_tokens: int
    vision_tokens: int
    expected_compression: float | None
    expected_precision: float | None
    reason: str


@dataclass
class DocumentPlan:
    """A document's routed pages and its vision-token totals (routed vs all-Gundam)."""

    source: str
    pages: list[PagePlan] = field(default_factory=list)
    total_vision_tokens: int = 0
    all_gundam_vision_tokens: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.error is None:
            del data["error"]
        return data


def _plan_pages(plan: DocumentPlan, path: Path, settings: Settings, policy: RoutingPolicy) -> None:
    engine = engine_capabilities(settings)
    with open_document(path, settings) as document:
        for page in document.iter_pages():
            if page.unreadable is not None:  # ingest records it failed; the rest goes on
                plan.pages.append(
                    PagePlan(page.page_no, "unreadable", None, 0, 0, None, None, page.unreadable)
                )
                continue
            # Priced at the size the OCR task renders (raster pages: their own resolution).
            size = page.render_size(settings.render_dpi)
            decision = route_page(
                extract_page_features(page.fitz_page),
                page.width,
                page.height,
                policy=policy,
                precision_target=settings.precision_target,
                render_dpi=size.dpi,
                engine=engine,
            )
            plan.pages.append(
                PagePlan(
                    page_no=page.page_no,
                    route=str(decision.route),
                    mode=str(decision.mode) if decision.mode else None,
                    est_text_tokens=decision.est_text_tokens,
                    vision_tokens=decision.vision_tokens,
                    expected_compression=decision.expected_compression,
                    expected_precision=decision.expected_precision,
                    reason=decision.reason,
                )
            )
            plan.total_vision_tokens += decision.vision_tokens
            plan.all_gundam_vision_tokens += decision.vision_tokens_in(Mode.GUNDAM)


def plan_document(source: Source, settings: Settings, policy: RoutingPolicy) -> DocumentPlan:
    """Route every page of one document (a local file or an S3 object)."""
    plan = DocumentPlan(source=source.uri)
    try:
        with staged(source, settings) as staged_file:
            _plan_pages(plan, staged_file.path, settings, policy)
    except (PermanentInputError, OSError) as exc:
        plan.error = str(exc) or type(exc).__name__
    return plan


def plan_documents(
    paths: list[str], settings: Settings, policy: RoutingPolicy | None = None
) -> list[DocumentPlan]:
    """Plans for every document under `paths` (files, directories, `s3://` prefixes)."""
    policy = policy or settings.routing_policy
    return [plan_document(source, settings, policy) for source in resolve_sources(paths)]


WIDE_LAYOUT_COLUMNS = 120  # below this the reason column would wrap a word or two per line


def print_plans(plans: list[DocumentPlan], console: Console) -> None:
    """Each plan as a table; on a narrow terminal the reasons go under the table, one
    wrapped paragraph per page, instead of into a column squeezed to a word per line."""
    for plan in plans:
        _print_plan(console, plan, wide=console.width >= WIDE_LAYOUT_COLUMNS)


def _print_plan(console: Console, plan: DocumentPlan, *, wide: bool) -> None:
    if plan.error is not None:
        error = Text.assemble((plan.source, "bold"), ": ", ("error", "red"), f" {plan.error}")
        console.print(error)
        return
    if wide:
        headers = ["page", "route", "mode", "est. tokens", "vision tokens", "compression"]
        headers += ["precision", "reason"]
    else:  # short headers that fit 80 columns without an ellipsis
        headers = ["page", "route", "mode", "est.", "vision", "ratio", "prec."]
    table = Table(*headers, title=Text(plan.source), title_justify="left")
    for page in plan.pages:
        table.add_row(
            str(page.page_no),
            page.route,
            page.mode or "",
            str(page.est_text_tokens),
            str(page.vision_tokens),
            f"{page.expected_compression:.1f}x" if page.expected_compression is not None else "",
            f"{page.expected_precision:.0%}" if page.expected_precision is not None else "",
            *([Text(page.reason)] if wide else []),  # plain: reasons hold [brackets]
        )
    console.print(table)
    if not wide:
        for page in plan.pages:
            console.print(Text(f"page {page.page_no}: {page.reason}"), overflow="fold")
    saved = plan.all_gundam_vision_tokens - plan.total_vision_tokens
    share = saved / plan.all_gundam_vision_tokens if plan.all_gundam_vision_tokens else 0.0
    console.print(
        f"vision tokens: {plan.total_vision_tokens} routed vs {plan.all_gundam_vision_tokens} "
        f"all-Gundam ({saved} saved, {share:.0%})\n"
    )
