"""`ocrflow plan`: a dry run of routing over the bundled samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
SAMPLE_DOCUMENTS = sorted(
    p for p in SAMPLES.iterdir() if p.suffix in {".pdf", ".png", ".tiff"}
)  # fmt: skip
PAGE_FIELDS = {
    "page_no", "route", "mode", "est_text_tokens", "vision_tokens", "expected_compression",
    "expected_precision", "reason",
}  # fmt: skip


def _plan(*args: str) -> list[dict]:
    result = CliRunner().invoke(app, ["plan", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def auto_plans() -> list[dict]:
    return _plan(*map(str, SAMPLE_DOCUMENTS))


def test_plan_json_covers_every_sample_page(auto_plans):
    assert [Path(plan["source"]).name for plan in auto_plans] == [p.name for p in SAMPLE_DOCUMENTS]
    for plan in auto_plans:
        assert "error" not in plan
        assert plan["pages"], plan["source"]
        assert [page["page_no"] for page in plan["pages"]] == list(range(1, len(plan["pages"]) + 1))
        for page in plan["pages"]:
            assert set(page) == PAGE_FIELDS
            assert page["reason"]
            assert page["route"] in {"blank", "text-layer", "ocr"}
            assert (page["mode"] is not None) == (page["route"] == "ocr")
        assert plan["total_vision_tokens"] == sum(p["vision_tokens"] for p in plan["pages"])
        assert plan["total_vision_tokens"] <= plan["all_gundam_vision_tokens"]


def test_plan_routes_samples_by_their_layout(auto_plans):
    by_name = {Path(plan["source"]).name: plan["pages"] for plan in auto_plans}
    assert by_name["slide.pdf"][0]["route"] == "text-layer"
    assert by_name["scan.pdf"][0]["route"] == "ocr"  # image only
    # The page with the ruled table: the default CPU engine cannot represent the table either,
    # so its text layer is kept (DeepSeek-OCR gets it in Gundam: test_routing_engine_aware.py).
    table_page = by_name["report.pdf"][1]
    assert table_page["route"] == "text-layer" and "[rapidocr]" in table_page["reason"]


def test_always_ocr_gives_every_non_blank_page_a_mode(auto_plans):
    plans = _plan(
        "--policy", "always-ocr", str(SAMPLES / "slide.pdf"), str(SAMPLES / "two_column.pdf")
    )
    slide, two_column = (plan["pages"][0] for plan in plans)
    assert slide["mode"] in {"tiny", "small"}
    assert two_column["mode"] == "gundam"
    assert all(p["mode"] for plan in plans for p in plan["pages"] if p["route"] != "blank")


def test_bad_files_are_reported_not_fatal(tmp_path):
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\nnot really a pdf")
    plans = _plan(str(broken), str(tmp_path / "missing.pdf"), str(SAMPLES / "slide.pdf"))
    assert [bool(plan.get("error")) for plan in plans] == [True, True, False]
    assert plans[0]["pages"] == []


def test_plan_prints_a_table_with_totals():
    result = CliRunner().invoke(app, ["plan", str(SAMPLES / "two_column.pdf")])
    assert result.exit_code == 0, result.output
    assert "all-Gundam" in result.output and "two_column.pdf" in result.output
