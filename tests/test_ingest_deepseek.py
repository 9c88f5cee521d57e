"""With a checkpoint configured, the pipeline OCRs through DeepSeek-OCR (tiny config, CPU):
every attempt is stored with its engine, mode and token stats, and the ladder is climbed."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from flows.ingest import ingest
from infra.db.models import Page, PageResult, TokenStat
from infra.db.session import session_scope
from tests.conftest import SAMPLES_DIR

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_scanned_page_goes_through_deepseek_ocr_with_token_stats(
    postgres_url: str, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OCRFLOW_DATABASE_URL", postgres_url)
    monkeypatch.setenv("OCRFLOW_MODEL_PATH", str(tiny_checkpoint))
    monkeypatch.setenv("OCRFLOW_DEVICE", "cpu")
    monkeypatch.setenv("OCRFLOW_MAX_NEW_TOKENS", "8")

    outcome = ingest([str(SAMPLES_DIR / "scan.pdf")])[0]

    assert outcome["status"] == "done"
    with session_scope(postgres_url) as session:
        page = session.scalars(select(Page)).one()
        attempts = session.scalars(select(PageResult).order_by(PageResult.attempt)).all()
        stats = session.scalars(select(TokenStat).order_by(TokenStat.page_result_id)).all()
        # Untrained weights never finish within 8 tokens: every rung is tried and kept, and
        # a page without a text layer ends as needs_review, never dropped.
        assert page.status == "needs_review"
        assert {a.engine for a in attempts} == {"deepseek-ocr"}
        assert [a.mode for a in attempts] == ["tiny", "small", "base", "large", "gundam"]
        assert all(a.finish_reason == "length" and not a.accepted for a in attempts)
        assert len(stats) == len(attempts)
        assert all(s.output_tokens == 8 and s.vision_tokens and s.prompt_tokens for s in stats)
        by_mode = {a.mode: s.valid_vision_tokens for a, s in zip(attempts, stats, strict=True)}
        assert by_mode["tiny"] == 64 and by_mode["small"] == 100
