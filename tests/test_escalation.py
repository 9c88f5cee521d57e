"""Escalation end to end through the page pipeline, with a scripted engine standing in for the
GPU: it loops, truncates or reads on demand per mode. No page is ever dropped."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from infra.db.models import Page, PageResult
from infra.db.repository import DocumentIdentity, RetryPolicy, claim_document, record_page
from infra.db.session import session_scope
from infra.settings import RoutingPolicy, Settings
from infra.vocabulary import Mode
from models.engine import FinishReason, OcrRequest, OcrResult
from tasks.pages import plan_pages, recognize_pages
from tests.conftest import SAMPLES_DIR

SCAN = SAMPLES_DIR / "scan.pdf"  # image only, no text layer
REPORT = SAMPLES_DIR / "report.pdf"  # born digital
RETRY = RetryPolicy(max_failures=3, base_seconds=1, max_seconds=10)
SCAN_TEXT = json.loads((SAMPLES_DIR / "ground_truth.json").read_text())["scan.pdf"][0]


class ScriptedEngine:
    """Answers each mode as scripted: `loop`, `truncate`, or `read` (the page's true text)."""

    name = "scripted"
    model_revision = "script-1"

    def __init__(self, script: dict[Mode, str], text: str = SCAN_TEXT) -> None:
        self.script = script
        self.text = text
        self.calls: list[Mode | None] = []

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]:
        return [self._answer(request) for request in requests]

    def _answer(self, request: OcrRequest) -> OcrResult:
        self.calls.append(request.mode)
        behaviour = self.script.get(request.mode, "read")
        text, finish = {
            "loop": (" ".join(["the committee agreed that"] * 60), FinishReason.EOS),
            "truncate": (self.text[:80], FinishReason.LENGTH),
            "read": (self.text, FinishReason.EOS),
        }[behaviour]
        return OcrResult(
            key=request.key,
            markdown=text,
            blocks=[],
            raw_output=text,
            finish_reason=finish,
            engine=self.name,
            model_revision=self.model_revision,
            mode=request.mode,
            vision_tokens=100,
            valid_vision_tokens=100,
            prompt_tokens=120,
            output_tokens=len(text.split()),
        )


def run_pages(path, engine, **settings):
    config = Settings(database_url="sqlite://", **settings)
    plans = plan_pages(path, config, [1])
    return plans[0], recognize_pages(path, config, plans, engine)[0]


def test_looping_then_truncated_page_is_retried_up_the_ladder_until_it_reads() -> None:
    engine = ScriptedEngine({Mode.TINY: "loop", Mode.SMALL: "truncate"})
    plan, record = run_pages(SCAN, engine)

    assert plan.decision.mode is Mode.TINY
    assert engine.calls == [Mode.TINY, Mode.SMALL, Mode.BASE]
    assert record.fields["status"] == "done"
    assert record.fields["mode"] == "base"
    attempts = [a.result_fields for a in record.attempts]
    assert [a["accepted"] for a in attempts] == [False, False, True]
    assert "repeat" in attempts[0]["rejection_reason"] or "loop" in attempts[0]["rejection_reason"]
    assert "token cap" in attempts[1]["rejection_reason"]
    assert attempts[2]["markdown"] == SCAN_TEXT


def test_page_failing_every_rung_falls_back_to_its_text_layer() -> None:
    engine = ScriptedEngine(dict.fromkeys(Mode, "loop"))
    plan, record = run_pages(REPORT, engine, routing_policy=RoutingPolicy.ALWAYS_OCR)

    attempts = [a.result_fields for a in record.attempts]
    assert plan.decision.route == "ocr"
    assert engine.calls[-1] is Mode.GUNDAM  # climbed to the top rung
    assert all(not a["accepted"] for a in attempts[:-1])
    assert attempts[-1]["accepted"] and attempts[-1]["route"] == "text-layer"
    assert attempts[-1]["engine"] == "pymupdf-text"
    assert record.fields["status"] == "done" and record.fields["route"] == "text-layer"
    assert "fell back" in record.fields["error"]


def test_page_without_text_layer_failing_every_rung_is_kept_for_review(sqlite_url: str) -> None:
    engine = ScriptedEngine(dict.fromkeys(Mode, "truncate"))
    _, record = run_pages(SCAN, engine)

    assert record.fields["status"] == "needs_review"
    assert len(record.attempts) == len(engine.calls) >= 2
    assert not any(a.result_fields["accepted"] for a in record.attempts)

    with session_scope(sqlite_url) as session:
        claim = claim_document(
            session=session,
            identity=DocumentIdentity(source_uri=str(SCAN), sha256="0" * 64, size_bytes=1),
            pipeline_version="test",
            lease_seconds=60,
        )
        record_page(session=session, document_id=claim.document_id, page=record, retry=RETRY)
    with session_scope(sqlite_url) as session:
        page = session.scalars(select(Page)).one()
        stored = session.scalars(select(PageResult).order_by(PageResult.attempt)).all()
        assert page.status == "needs_review" and page.attempts == len(stored)
        assert [r.attempt for r in stored] == list(range(1, len(stored) + 1))
        assert all(r.rejection_reason for r in stored)


@pytest.mark.parametrize("breaking_page", [0, 2])
def test_engine_crash_on_one_page_leaves_only_that_page_retrying(breaking_page: int) -> None:
    class CrashingEngine(ScriptedEngine):
        def recognize(self, requests):
            if any(r.key == str(breaking_page + 1) for r in requests):
                raise RuntimeError("CUDA error: an illegal memory access")
            return super().recognize(requests)

    config = Settings(database_url="sqlite://", routing_policy=RoutingPolicy.ALWAYS_OCR)
    plans = plan_pages(REPORT, config, [1, 2, 3])
    records = recognize_pages(REPORT, config, plans, CrashingEngine({}))

    statuses = [r.fields["status"] for r in records]
    assert len(records) == 3
    assert statuses[breaking_page] == "retrying"  # an engine fault is not the page's verdict
    assert "illegal memory access" in records[breaking_page].fields["error"]
    [failed_attempt] = records[breaking_page].attempts
    assert failed_attempt.result_fields["finish_reason"] == "error"
    assert statuses.count("done") == 2
