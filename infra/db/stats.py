"""Aggregate counts over documents, pages and token stats: `ocrflow stats` and run summaries."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, case, func, select
from sqlalchemy.orm import Session, selectinload

from infra.db.models import Document, Page, PageResult, PageStatus, TokenStat
from infra.db.queries import OCR_ROUTE, final_result, page_tokens
from infra.settings import Settings
from infra.vocabulary import Mode

# Pure Python (no torch): the same counts the processors build prompts from, per model family.
from models.capabilities import family_of_engine, family_vision_tokens
from models.deepseek_ocr2.family import ModelFamily

POINTS_PER_INCH = 72

Scope = Callable[[Select, Any], Select]  # narrows a query to the documents asked about


@dataclass(frozen=True)
class CostBasis:
    """What turns stored token stats into a bill: the price of a GPU hour, how pages are
    rendered (the router prices modes at that pixel size, so the baselines must use it too),
    and the configured model's family, whose budgets price pages no DeepSeek-OCR 2 attempt read
    (text-layer and blank pages in the baselines)."""

    gpu_hour_usd: float
    render_dpi: float
    max_page_pixels: int
    family: ModelFamily = ModelFamily.DEEPSEEK_OCR

    @classmethod
    def from_settings(cls, settings: Settings) -> CostBasis:
        from models.registry import model_family

        return cls(
            settings.gpu_hour_usd,
            settings.render_dpi,
            settings.max_page_pixels,
            model_family(settings),
        )


def collect_stats(
    *,
    session: Session,
    document_ids: Collection[int] | None = None,
    per_page: bool | None = None,
    cost_basis: CostBasis | None = None,
) -> dict[str, Any]:
    """Counts by status/route/mode and token totals, optionally for some documents only.

    `tokens` keeps flat totals over every attempt (a table prints it as rows); `token_totals`
    breaks the accepted results down by route, planned mode and how output tokens were
    obtained. `per_page` (default: when documents are named) adds every page's tokens.
    With a `cost_basis`, `cost` prices the GPU time and states routing's vision-token saving
    (`cost_report`).
    """

    def scoped(query: Select, column) -> Select:
        return query if document_ids is None else query.where(column.in_(document_ids))

    def counts(query: Select) -> dict[str, int]:
        return {str(key): value for key, value in session.execute(query).all()}

    def summed(column) -> Any:
        return func.coalesce(func.sum(column), 0)

    documents = counts(
        scoped(select(Document.status, func.count()), Document.id).group_by(Document.status)
    )

    def page_counts(column) -> dict[str, int]:
        return counts(scoped(select(column, func.count()), Page.document_id).group_by(column))

    by_status = page_counts(Page.status)
    # Which engine (and so which model: deepseek-ocr or deepseek-ocr-2) read the pages.
    by_engine = counts(
        scoped(
            select(PageResult.engine, func.count()).join(Page, PageResult.page_id == Page.id),
            Page.document_id,
        )
        .where(PageResult.accepted)
        .group_by(PageResult.engine)
    )
    # Only OCR pages have a mode: counting the others would list them under `None`.
    by_mode = counts(
        scoped(select(Page.mode, func.count()), Page.document_id)
        .where(Page.route == OCR_ROUTE)
        .group_by(Page.mode)
    )
    accepted_tokens = scoped(
        select(
            func.count(TokenStat.id),
            func.coalesce(func.sum(TokenStat.vision_tokens), 0),
            func.coalesce(func.sum(TokenStat.valid_vision_tokens), 0),
            func.coalesce(func.sum(TokenStat.prompt_tokens), 0),
            func.coalesce(func.sum(TokenStat.output_tokens), 0),
            func.coalesce(func.sum(TokenStat.encode_ms), 0.0),
            func.coalesce(func.sum(TokenStat.decode_ms), 0.0),
        )
        .join(PageResult, TokenStat.page_result_id == PageResult.id)
        .join(Page, PageResult.page_id == Page.id),
        Page.document_id,
    )
    attempts, vision, valid, prompt, output, encode_ms, decode_ms = session.execute(
        accepted_tokens
    ).one()
    accepted = _accepted_token_totals(session, scoped, summed)
    stats = {
        "documents": documents,
        "pages": {
            "total": sum(by_status.values()),
            "by_status": by_status,
            "by_route": page_counts(Page.route),
            "by_mode": by_mode,
            "by_engine": by_engine,
        },
        "tokens": {
            "attempts_with_tokens": attempts,
            "vision_tokens": vision,
            "valid_vision_tokens": valid,
            "prompt_tokens": prompt,
            "output_tokens": output,
            "compression_ratio": round(output / valid, 3) if valid else None,
            "encode_ms": round(float(encode_ms), 1),
            "decode_ms": round(float(decode_ms), 1),
            "planned_vision_tokens": accepted["planned_vision_tokens"],
            "accepted_output_tokens": accepted["output_tokens"],
        },
        "token_totals": accepted,
    }
    if cost_basis is not None:
        stats["cost"] = cost_report(session=session, scoped=scoped, basis=cost_basis)
    if per_page if per_page is not None else document_ids is not None:
        stats["by_page"] = _page_rows(session, scoped)
    return stats


def cost_report(*, session: Session, scoped: Scope, basis: CostBasis) -> dict[str, Any]:
    """GPU seconds, pages per GPU hour and dollars per million pages, and the vision tokens
    routing saved against all-Gundam and all-Base.

    Pages are the finished ones (done or needs_review) on every route: text-layer, blank and
    CPU-engine (RapidOCR) pages count as pages and add no GPU time. GPU time is every
    attempt's `gpu_ms` (on any page, finished or not), rejected attempts included: an
    escalation's first try ran on the GPU too, and the bill includes it.
    """
    attempts = (
        select()
        .select_from(TokenStat)
        .join(PageResult, TokenStat.page_result_id == PageResult.id)
        .join(Page, PageResult.page_id == Page.id)
    )
    gpu_ms, rejected_ms, attempts_with_gpu = session.execute(
        scoped(
            attempts.add_columns(
                func.coalesce(func.sum(TokenStat.gpu_ms), 0.0),
                func.coalesce(
                    func.sum(case((PageResult.accepted, 0.0), else_=TokenStat.gpu_ms)), 0.0
                ),
                func.count(TokenStat.gpu_ms),
            ),
            Page.document_id,
        )
    ).one()
    finished = Page.status.in_(PageStatus.SUCCESS)
    pages, ocr_pages = session.execute(
        scoped(
            select(func.count(), func.count(case((Page.route == OCR_ROUTE, 1)))).where(finished),
            Page.document_id,
        )
    ).one()
    ocr_pages_with_gpu = session.execute(
        scoped(
            attempts.add_columns(func.count(func.distinct(Page.id))).where(
                finished, Page.route == OCR_ROUTE, TokenStat.gpu_ms.is_not(None)
            ),
            Page.document_id,
        )
    ).scalar_one()
    gpu_hours = float(gpu_ms) / 3_600_000
    return {
        "gpu_hour_usd": basis.gpu_hour_usd,
        "pages": pages,
        "ocr_pages": ocr_pages,
        "ocr_pages_with_gpu_time": ocr_pages_with_gpu,
        "attempts_with_gpu_time": attempts_with_gpu,
        "gpu_seconds": round(float(gpu_ms) / 1000, 3),
        "gpu_seconds_rejected_attempts": round(float(rejected_ms) / 1000, 3),
        "pages_per_gpu_hour": round(pages / gpu_hours, 1) if gpu_hours and pages else None,
        "usd_per_million_pages": (
            round(basis.gpu_hour_usd * gpu_hours / pages * 1_000_000, 2) if pages else None
        ),
        "vision_tokens_saved_vs_gundam": _vision_token_savings(session, scoped, basis),
    }


def _vision_token_savings(session: Session, scoped: Scope, basis: CostBasis) -> dict[str, Any]:
    """Routing's vision tokens against every page in Gundam and every page in Base, over all
    finished pages and over the OCR pages alone (the saving of mode choice by itself).

    Counted as `<image>` placeholders, what the model encodes and attends over (the same
    count as the DeepSeek engine's `vision_tokens` spent), from each page's size in pixels:
    points at the render DPI, capped at `max_page_pixels`, as the router renders a PDF page.
    Routing's side is every OCR attempt in its planned mode, so escalations are paid for;
    text-layer and blank pages cost none. Planned modes rather than tokens spent, so a CPU
    install (which spends none) shows what routing would save on a GPU.

    Each model prices in its own budgets: an attempt by its engine's family (DeepSeek-OCR 2:
    256 + 144 per crop + 1), a page's baselines by DeepSeek-OCR 2's when one of its attempts
    was read by it, else by the configured model's (`basis.family`).
    """
    finished = Page.status.in_(PageStatus.SUCCESS)
    size = (Page.width, Page.height)
    ocr2 = ModelFamily.DEEPSEEK_OCR_2
    read_by_ocr2 = Page.id.in_(select(PageResult.page_id).where(PageResult.engine == ocr2.value))
    pages_by_size = session.execute(
        scoped(select(*size, Page.route, read_by_ocr2, func.count()), Page.document_id)
        .where(finished)
        .group_by(*size, Page.route, read_by_ocr2)
    ).all()
    attempts_by_size = session.execute(
        scoped(
            select(*size, Page.route, PageResult.engine, TokenStat.planned_mode, func.count())
            .select_from(TokenStat)
            .join(PageResult, TokenStat.page_result_id == PageResult.id)
            .join(Page, PageResult.page_id == Page.id),
            Page.document_id,
        )
        .where(finished, TokenStat.route == OCR_ROUTE, TokenStat.planned_mode.is_not(None))
        .group_by(*size, Page.route, PageResult.engine, TokenStat.planned_mode)
    ).all()
    pixels = {
        (width, height): _rendered_pixels(width, height, basis)
        for width, height, *_ in [*pages_by_size, *attempts_by_size]
    }

    def placeholders(family: ModelFamily, mode: Mode | str, size: tuple[float, float]) -> int:
        return family_vision_tokens(family, mode, *pixels[size], valid=False)

    scopes = {"all": _token_totals(), "ocr": _token_totals()}
    families: dict[str, int] = {}
    for width, height, route, by_ocr2, n in pages_by_size:
        family = ocr2 if by_ocr2 else basis.family
        families[family.value] = families.get(family.value, 0) + n
        for scope in ("all", "ocr") if route == OCR_ROUTE else ("all",):
            scopes[scope]["pages"] += n
            for mode in (Mode.GUNDAM, Mode.BASE):
                scopes[scope][f"all_{mode}"] += n * placeholders(family, mode, (width, height))
    for width, height, route, engine, mode, n in attempts_by_size:
        tokens = n * placeholders(family_of_engine(engine), mode, (width, height))
        scopes["all"]["routed"] += tokens
        if route == OCR_ROUTE:  # a page that fell back to its text layer is not an OCR page
            scopes["ocr"]["routed"] += tokens
    return {
        "counted_as": "image placeholders",
        "render_dpi": basis.render_dpi,
        "pages_by_model": families,
        **_with_savings(scopes["all"]),
        "ocr_pages": _with_savings(scopes["ocr"]),
    }


def _token_totals() -> dict[str, int]:
    return {"pages": 0, "routed": 0, "all_gundam": 0, "all_base": 0}


def _with_savings(totals: dict[str, int]) -> dict[str, Any]:
    savings: dict[str, Any] = {}
    for baseline in ("gundam", "base"):
        all_mode = totals[f"all_{baseline}"]
        saved = all_mode - totals["routed"]
        savings[f"saved_vs_{baseline}"] = saved
        savings[f"saved_vs_{baseline}_share"] = round(saved / all_mode, 3) if all_mode else None
    return {**totals, **savings}


def _rendered_pixels(width: float, height: float, basis: CostBasis) -> tuple[int, int]:
    """A `width` x `height` pt page's pixels at the render DPI, scaled down to fit
    `max_page_pixels` as the splitter does (`tasks.split.SourcePage.render_size`)."""
    zoom = basis.render_dpi / POINTS_PER_INCH

    def size(zoom: float) -> tuple[int, int]:
        return max(1, math.ceil(width * zoom)), max(1, math.ceil(height * zoom))

    if math.prod(size(zoom)) > basis.max_page_pixels:
        zoom = math.sqrt(basis.max_page_pixels / max(width * height, 1e-9))
        while math.prod(size(zoom)) > basis.max_page_pixels:  # ceil() rounding at the edge
            zoom *= 0.999
    return size(zoom)


def _accepted_token_totals(session: Session, scoped, summed) -> dict[str, Any]:
    """Token stats of the accepted results: totals, by route, by planned mode, by source."""
    base = (
        select()
        .select_from(TokenStat)
        .join(PageResult, TokenStat.page_result_id == PageResult.id)
        .join(Page, PageResult.page_id == Page.id)
        .where(PageResult.accepted)
    )
    columns = (
        func.count(TokenStat.id),
        summed(TokenStat.planned_vision_tokens),
        summed(TokenStat.vision_tokens),
        summed(TokenStat.output_tokens),
    )

    def grouped(key) -> dict[str, dict[str, int]]:
        rows = session.execute(scoped(base.add_columns(key, *columns), Page.document_id)
                               .group_by(key)).all()  # fmt: skip
        return {
            str(group): {
                "results": n,
                "planned_vision_tokens": planned,
                "vision_tokens": vision,
                "output_tokens": output,
            }
            for group, n, planned, vision, output in rows
        }

    by_route = grouped(TokenStat.route)
    totals = {
        key: sum(group[key] for group in by_route.values())
        for key in ("results", "planned_vision_tokens", "vision_tokens", "output_tokens")
    }
    by_source = {
        source: group["output_tokens"]
        for source, group in grouped(TokenStat.output_tokens_source).items()
    }
    by_mode = grouped(TokenStat.planned_mode)
    by_mode.pop("None", None)  # text-layer and blank results
    return {
        **totals,
        "by_route": by_route,
        "by_planned_mode": by_mode,
        "output_tokens_by_source": by_source,
    }


def _page_rows(session: Session, scoped) -> list[dict[str, Any]]:
    pages = session.scalars(
        scoped(select(Page), Page.document_id)
        .options(selectinload(Page.results).selectinload(PageResult.token_stat))
        .order_by(Page.document_id, Page.page_no)
    ).all()
    return [
        {
            "document_id": page.document_id,
            "page": page.page_no,
            "status": page.status,
            "engine": result.engine if (result := final_result(page)) is not None else None,
            **page_tokens(page),
        }
        for page in pages
    ]


def document_failures(*, session: Session, document_ids: Collection[int]) -> list[tuple[str, str]]:
    rows = session.execute(
        select(Document.source_uri, Document.error).where(
            Document.id.in_(document_ids), Document.error.is_not(None)
        )
    )
    return [(source, error) for source, error in rows]


def cost_lines(cost: dict[str, Any]) -> list[str]:
    """`cost_report` as plain sentences, the same in `ocrflow stats` and a run's artifact."""
    pages, gpu_seconds = cost["pages"], cost["gpu_seconds"]
    with_gpu = cost["ocr_pages_with_gpu_time"]
    gpu = (
        f"GPU time: {gpu_seconds:,.3f} s over {pages:,} pages ({cost['ocr_pages']:,} OCR pages,"
        f" {with_gpu:,} with GPU time; {cost['gpu_seconds_rejected_attempts']:,.3f} s of it on"
        " rejected attempts, counted)"
    )
    if not cost["attempts_with_gpu_time"]:
        gpu = (
            f"GPU time: none over {pages:,} pages ({cost['ocr_pages']:,} OCR pages, read on the"
            " CPU or stored before GPU time was recorded)"
        )
    price = f"${cost['gpu_hour_usd']:,.2f} per GPU hour"
    rate = cost["pages_per_gpu_hour"]
    usd = cost["usd_per_million_pages"]
    throughput = f"{rate:,.1f} pages per GPU hour" if rate is not None else "no GPU hours"
    per_million = f"${usd:,.2f} per million pages" if usd is not None else "no pages to price"
    lines = [gpu, f"GPU cost: {throughput}; {per_million} at {price}"]
    vision = cost["vision_tokens_saved_vs_gundam"]
    ocr2 = vision.get("pages_by_model", {}).get(ModelFamily.DEEPSEEK_OCR_2.value)
    in_ocr2 = f", {ocr2:,} of them in DeepSeek-OCR 2's budgets" if ocr2 else ""
    lines.append(
        f"Vision tokens ({vision['counted_as']} at {vision['render_dpi']:g} dpi), "
        f"{vision['pages']:,} pages{in_ocr2}: {_savings(vision)}"
    )
    ocr = vision["ocr_pages"]
    lines.append(f"  of which the {ocr['pages']:,} OCR pages: {_savings(ocr)}")
    return lines


def _savings(totals: dict[str, Any]) -> str:
    parts = [f"routed {totals['routed']:,}"]
    for baseline, name in (("gundam", "all-Gundam"), ("base", "all-Base")):
        share = totals[f"saved_vs_{baseline}_share"]
        parts.append(
            f"{name} {totals[f'all_{baseline}']:,} (saved {totals[f'saved_vs_{baseline}']:,}"
            f"{f', {share:.1%}' if share is not None else ''})"
        )
    return "; ".join(parts)
