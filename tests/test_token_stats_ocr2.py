"""Token statistics and the cost report for pages DeepSeek-OCR 2 read: planned and spent vision
tokens in its budgets (256 + 144 per crop + 1), the engine named on every page, and routing's
savings priced in those budgets.

Pages are planned for a DeepSeek-OCR 2 folder (`OCRFLOW_MODEL_PATH`; planning reads only its
`config.json`) and recorded through the real path with a scripted engine that spends what
the OCR-2 processor would; expected figures come from `geometry`, not from the stats module.
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select

from infra.db.models import TokenStat
from infra.db.session import session_scope
from infra.db.stats import CostBasis, collect_stats, cost_lines
from infra.settings import EngineChoice, Settings
from infra.vocabulary import Mode, Route
from models.deepseek_ocr import geometry as v1_geometry
from models.deepseek_ocr2 import geometry
from models.engine import FinishReason, OcrRequest, OcrResult
from tasks.pages import plan_pages, recognize_pages
from tests.born_digital import SCAN_TEXT, write_pdf
from tests.stored import store_document

KINDS = ["blank", "german-prose", "scan", "scan"]


class Ocr2Engine:
    """Spends what DeepSeek-OCR 2's processor gives the page in the requested budget."""

    name = "deepseek-ocr-2"
    model_revision = "random"

    def __init__(self) -> None:
        self.spent: list[int] = []

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]:
        results = []
        for request in requests:
            tokens = geometry.count_placeholders(request.mode, *request.image.size)
            self.spent.append(tokens)
            results.append(
                OcrResult(key=request.key, markdown=SCAN_TEXT, blocks=[], raw_output=SCAN_TEXT,
                          finish_reason=FinishReason.EOS, engine=self.name,
                          model_revision="random", mode=request.mode, vision_tokens=tokens,
                          valid_vision_tokens=tokens, prompt_tokens=tokens + 11,
                          output_tokens=123, encode_ms=5.0, decode_ms=400.0, gpu_ms=300.0)
            )  # fmt: skip
        return results


def test_ocr2_pages_are_priced_in_their_own_budgets(tmp_path: Path, database_url: str):
    checkpoint = tmp_path / "deepseek-ocr-2"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "deepseek_ocr2"}))
    settings = Settings(
        database_url=database_url, engine=EngineChoice.DEEPSEEK, model_path=checkpoint
    )
    pdf = write_pdf(tmp_path / "mixed.pdf", KINDS)
    plans = plan_pages(pdf, settings, list(range(1, len(KINDS) + 1)))
    scans = [plan.decision for plan in plans if plan.decision.route == Route.OCR]
    assert len(scans) == 2 and {d.family for d in scans} == {"deepseek-ocr-2"}
    engine = Ocr2Engine()
    document_id = store_document(pdf, database_url, recognize_pages(pdf, settings, plans, engine))

    priced = [geometry.count_placeholders(d.mode, *d.image_size) for d in scans]
    assert sorted(engine.spent) == sorted(priced)  # the engine spent what the router priced
    assert priced != [v1_geometry.count_placeholders(d.mode, *d.image_size) for d in scans]
    with session_scope(database_url) as session:
        rows = session.execute(
            select(TokenStat.planned_vision_tokens, TokenStat.vision_tokens).where(
                TokenStat.route == Route.OCR
            )
        ).all()
        assert sorted(planned for planned, _ in rows) == sorted(priced)
        assert sorted(spent for _, spent in rows) == sorted(priced)
        stats = collect_stats(
            session=session,
            document_ids=[document_id],
            cost_basis=CostBasis.from_settings(settings),
        )

    assert stats["pages"]["by_engine"]["deepseek-ocr-2"] == 2
    assert {row["engine"] for row in stats["by_page"] if row["route"] == Route.OCR} == {
        "deepseek-ocr-2"
    }
    saving = stats["cost"]["vision_tokens_saved_vs_gundam"]
    assert saving["pages_by_model"] == {"deepseek-ocr-2": 4}  # the configured model's budgets
    ocr = saving["ocr_pages"]
    assert ocr["routed"] == sum(priced)
    gundam = sum(geometry.count_placeholders(Mode.GUNDAM, *d.image_size) for d in scans)
    assert ocr["all_gundam"] == gundam and ocr["saved_vs_gundam"] == gundam - sum(priced)
    assert "4 of them in DeepSeek-OCR 2's budgets" in " ".join(cost_lines(stats["cost"])).replace(
        ",", ""
    )
