"""How much one ingest run works at once when nothing is set: with GPU workers (engine=queue)
enough documents and windows to keep their hundreds of slots full, else one document and two
windows (an in-process engine holds one batch at a time); a setting always wins."""

from __future__ import annotations

import pytest

from infra.settings import EngineChoice, Settings
from tasks.parallel import QUEUE_DOCUMENTS, QUEUE_WINDOWS, document_concurrency, windows_in_flight


@pytest.mark.parametrize(
    ("engine", "documents", "windows"),
    [
        (EngineChoice.QUEUE, QUEUE_DOCUMENTS, QUEUE_WINDOWS),
        (EngineChoice.RAPIDOCR, 1, 2),
        (EngineChoice.DEEPSEEK, 1, 2),
    ],
)
def test_defaults_follow_the_engine(engine: EngineChoice, documents: int, windows: int) -> None:
    settings = Settings(engine=engine)
    assert (document_concurrency(settings), windows_in_flight(settings)) == (documents, windows)
    assert QUEUE_DOCUMENTS > 1 and QUEUE_WINDOWS > 2


def test_a_setting_wins_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OCRFLOW_DOCUMENT_CONCURRENCY", "3")
    monkeypatch.setenv("OCRFLOW_WINDOWS_IN_FLIGHT", "0")  # at least one
    settings = Settings(engine=EngineChoice.QUEUE)
    assert (document_concurrency(settings), windows_in_flight(settings)) == (3, 1)
