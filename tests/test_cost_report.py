"""The cost report (issue 13, item 3): `stats` prices the GPU time stored per attempt and states
the vision tokens routing saved, on both stores, with the GPU price taken from the settings.

Results go through the real planning, escalation and recording path with a scripted engine
that reports known `gpu_ms`; expected figures are computed here from what the engine returned
and from the pixel sizes the router itself used, not from the stats module's own arithmetic.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from flows.cli import app
from flows.reporting import cost_rows
from infra.db.models import TokenStat
from infra.db.session import session_scope
from infra.db.stats import CostBasis, collect_stats
from infra.settings import Settings
from infra.vocabulary import Mode, Route
from models.deepseek_ocr.geometry import count_placeholders
from models.engine import FinishReason, OcrRequest, OcrResult
from tasks.pages import PagePlan, plan_pages, recognize_pages
from tests.born_digital import SCAN_TEXT, write_pdf
from tests.stored import store_document

KINDS = ["blank", "german-prose", "scan", "scan"]


class TimedEngine:
    """A DeepSeek-like engine that reports a known device-time share per page, or none (a CPU
    engine). In the modes in `truncate` it stops at the length limit, so the page is
    rejected and escalated one mode up: that first attempt's GPU time is spent all the same."""

    name = "timed"
    model_revision = "1"

    def __init__(self, *, gpu: bool = True) -> None:
        self.gpu = gpu
        self.truncate: frozenset[Mode] = frozenset()
        self.calls: list[tuple[Mode | None, float | None]] = []  # (mode, gpu_ms returned)

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]:
        return [self._answer(request) for request in requests]

    def _answer(self, request: OcrRequest) -> OcrResult:
        gpu_ms = 250.0 + 125.0 * len(self.calls) if self.gpu else None
        self.calls.append((request.mode, gpu_ms))
        cut = request.mode in self.truncate
        text = SCAN_TEXT[:60] if cut else SCAN_TEXT
        finish = FinishReason.LENGTH if cut else FinishReason.EOS
        return OcrResult(key=request.key, markdown=text, blocks=[], raw_output=text,
                         finish_reason=finish, engine=self.name, model_revision="1",
                         mode=request.mode, vision_tokens=273, valid_vision_tokens=256,
                         prompt_tokens=290, output_tokens=123, encode_ms=5.0,
                         decode_ms=4000.0, gpu_ms=gpu_ms)  # fmt: skip


def _ingest(
    pdf: Path, url: str, engine: TimedEngine, *, escalate: bool = False
) -> tuple[int, list[PagePlan]]:
    """Plans, recognises and records every page of `pdf`: the path `ingest` takes. With
    `escalate`, the engine truncates in the modes the scans were planned in."""
    settings = Settings(database_url=url)
    plans = plan_pages(pdf, settings, list(range(1, len(KINDS) + 1)))
    if escalate:
        engine.truncate = frozenset(p.decision.mode for p in plans if p.decision.mode)
    records = recognize_pages(pdf, settings, plans, engine)
    return store_document(pdf, url, records), plans


def _expected_vision_tokens(plans: list[PagePlan], engine: TimedEngine) -> dict[str, int]:
    """All-Gundam and all-Base at the pixel size the router priced each page at; routed: each
    OCR request in the mode it was sent in (the scans share one size)."""
    scan = next(p for p in plans if p.decision.route == Route.OCR).decision.image_size
    return {
        "pages": len(plans),
        "all_gundam": sum(count_placeholders(Mode.GUNDAM, *p.decision.image_size) for p in plans),
        "all_base": sum(count_placeholders(Mode.BASE, *p.decision.image_size) for p in plans),
        "routed": sum(count_placeholders(mode, *scan) for mode, _ in engine.calls),
    }


def _cost(url: str, document_ids: list[int] | None, price: float = 3.0) -> dict:
    with session_scope(url) as session:
        stats = collect_stats(
            session=session,
            document_ids=document_ids,
            cost_basis=CostBasis.from_settings(Settings(database_url=url, gpu_hour_usd=price)),
        )
    return stats["cost"]


@pytest.fixture
def mixed_pdf(tmp_path: Path) -> Path:
    return write_pdf(tmp_path / "mixed.pdf", KINDS)


def test_gpu_seconds_price_every_attempt_and_pages_count_on_every_route(
    mixed_pdf: Path, database_url: str
):
    engine = TimedEngine()
    document_id, plans = _ingest(mixed_pdf, database_url, engine, escalate=True)
    routes = [plan.decision.route for plan in plans]
    assert routes == [Route.BLANK, Route.TEXT_LAYER, Route.OCR, Route.OCR]
    assert len(engine.calls) == 4  # each scan: rejected in its planned mode, then one mode up

    cost = _cost(database_url, [document_id], price=2.5)

    gpu_seconds = sum(ms for _, ms in engine.calls) / 1000
    rejected_seconds = sum(ms for _, ms in engine.calls[:2]) / 1000
    assert cost["gpu_seconds"] == pytest.approx(gpu_seconds)
    assert cost["gpu_seconds_rejected_attempts"] == pytest.approx(rejected_seconds)
    assert cost["pages"] == 4 and cost["ocr_pages"] == 2  # blank and text layer count as pages
    assert cost["ocr_pages_with_gpu_time"] == 2 and cost["attempts_with_gpu_time"] == 4
    assert cost["gpu_hour_usd"] == 2.5
    assert cost["pages_per_gpu_hour"] == pytest.approx(4 / (gpu_seconds / 3600), abs=0.05)
    per_million = 2.5 * (gpu_seconds / 3600) / 4 * 1_000_000
    assert cost["usd_per_million_pages"] == pytest.approx(per_million, abs=0.005)
    with session_scope(database_url) as session:  # stored per attempt, beside decode_ms
        stored = session.scalars(select(TokenStat.gpu_ms).where(TokenStat.gpu_ms.is_not(None)))
        assert sorted(stored) == sorted(ms for _, ms in engine.calls)


def test_vision_tokens_saved_against_all_gundam_and_all_base(mixed_pdf: Path, database_url: str):
    engine = TimedEngine()
    document_id, plans = _ingest(mixed_pdf, database_url, engine, escalate=True)
    expected = _expected_vision_tokens(plans, engine)

    saving = _cost(database_url, [document_id])["vision_tokens_saved_vs_gundam"]

    assert {key: saving[key] for key in expected} == expected
    assert saving["saved_vs_gundam"] == expected["all_gundam"] - expected["routed"] > 0
    assert saving["saved_vs_base"] == expected["all_base"] - expected["routed"]
    share = (expected["all_gundam"] - expected["routed"]) / expected["all_gundam"]
    assert saving["saved_vs_gundam_share"] == pytest.approx(share, abs=0.0005)
    ocr = saving["ocr_pages"]  # mode choice alone: the two scans, escalations paid for
    ocr_plans = [p for p in plans if p.decision.route == Route.OCR]
    assert ocr["pages"] == 2 and ocr["routed"] == expected["routed"]
    gundam = sum(count_placeholders(Mode.GUNDAM, *p.decision.image_size) for p in ocr_plans)
    assert ocr["all_gundam"] == gundam and ocr["saved_vs_gundam"] == gundam - expected["routed"]


def test_cpu_pages_count_as_pages_without_gpu_time(tmp_path: Path, database_url: str):
    gpu_id, _ = _ingest(write_pdf(tmp_path / "gpu.pdf", KINDS), database_url, TimedEngine())
    cpu_engine = TimedEngine(gpu=False)
    cpu_id, _ = _ingest(write_pdf(tmp_path / "cpu.pdf", KINDS), database_url, cpu_engine)

    cpu = _cost(database_url, [cpu_id])
    both = _cost(database_url, None)

    assert cpu["pages"] == 4 and cpu["ocr_pages"] == 2
    assert cpu["ocr_pages_with_gpu_time"] == 0 and cpu["gpu_seconds"] == 0.0
    assert cpu["pages_per_gpu_hour"] is None and cpu["usd_per_million_pages"] == 0.0
    assert cpu["vision_tokens_saved_vs_gundam"]["routed"] > 0  # priced in its planned modes
    assert both["pages"] == 8 and both["ocr_pages_with_gpu_time"] == 2
    assert both["gpu_seconds"] == _cost(database_url, [gpu_id])["gpu_seconds"] > 0
    assert both["pages_per_gpu_hour"] == pytest.approx(8 / (both["gpu_seconds"] / 3600), 1e-3)


def test_stats_json_has_the_cost_at_the_configured_gpu_price(
    mixed_pdf: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
):
    _ingest(mixed_pdf, database_url, TimedEngine())
    monkeypatch.setenv("OCRFLOW_DATABASE_URL", database_url)
    monkeypatch.setenv("OCRFLOW_GPU_HOUR_USD", "4.5")
    runner = CliRunner()

    result = runner.invoke(app, ["stats", "--json"])
    assert result.exit_code == 0, result.output
    cost = json.loads(result.stdout)["cost"]
    assert cost == _cost(database_url, None, price=4.5)
    assert cost["gpu_hour_usd"] == 4.5 and cost["gpu_seconds"] > 0
    hours = cost["gpu_seconds"] / 3600
    assert cost["usd_per_million_pages"] == pytest.approx(4.5 * hours / 4 * 1e6, abs=0.01)

    cheaper = json.loads(runner.invoke(app, ["stats", "--json", "--gpu-hour-usd", "1.5"]).stdout)
    assert cheaper["cost"]["usd_per_million_pages"] == pytest.approx(
        cost["usd_per_million_pages"] / 3, abs=0.01
    )
    table = runner.invoke(app, ["stats"]).stdout
    assert f"{cost['gpu_seconds']:,.3f} s over 4 pages" in table
    assert f"${cost['usd_per_million_pages']:,.2f} per million pages at $4.50" in table
    saving = cost["vision_tokens_saved_vs_gundam"]
    assert f"all-Gundam {saving['all_gundam']:,} (saved {saving['saved_vs_gundam']:,}" in table


def test_the_run_summary_rows_carry_the_same_cost(mixed_pdf: Path, sqlite_url: str):
    document_id, _ = _ingest(mixed_pdf, sqlite_url, TimedEngine())
    cost = _cost(sqlite_url, [document_id])

    rows = cost_rows(cost)

    assert {"what": "cost", "key": "gpu_seconds", "count": cost["gpu_seconds"]} in rows
    assert {"what": "cost", "key": "usd_per_million_pages",
            "count": cost["usd_per_million_pages"]} in rows  # fmt: skip
    saved = cost["vision_tokens_saved_vs_gundam"]["saved_vs_gundam"]
    assert {"what": "cost vision tokens", "key": "saved_vs_gundam", "count": saved} in rows
    ocr_routed = cost["vision_tokens_saved_vs_gundam"]["ocr_pages"]["routed"]
    assert {"what": "cost vision tokens ocr pages", "key": "routed", "count": ocr_routed} in rows


@pytest.mark.usefixtures("prefect_server")
def test_an_ingest_run_publishes_the_cost_in_its_summary_artifact(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.ingest import ingest

    monkeypatch.setenv("OCRFLOW_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("OCRFLOW_GPU_HOUR_USD", "2.0")
    pdf = write_pdf(tmp_path / "born-digital.pdf", ["german-prose", "blank"])
    [outcome] = ingest([str(pdf)])
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ingest-summary"]))
        )
    summary = max(artifacts, key=lambda artifact: artifact.created)
    rows = json.loads(summary.data) if isinstance(summary.data, str) else summary.data

    cost = _cost(sqlite_url, [outcome["id"]], price=2.0)
    assert [row for row in rows if row["what"].startswith("cost")] == cost_rows(cost)
    assert cost["pages"] == 2 and cost["gpu_seconds"] == 0.0  # text layer and blank: no GPU
    assert cost["vision_tokens_saved_vs_gundam"]["saved_vs_gundam"] > 0
    assert "GPU time: none over 2 pages" in summary.description
    assert "at $2.00 per GPU hour" in summary.description
