"""The fault suite's shared record: each scenario writes its figures to
`bench/results/faults.json` (one entry per scenario, replaced when it runs again)."""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable
from pathlib import Path

import pytest

FAULTS_RESULT = Path(__file__).resolve().parents[2] / "bench" / "results" / "faults.json"


def record_fault(
    scenario: str,
    *,
    fault: str,
    injected: int,
    pages_checked: int,
    pages_lost: int,
    duplicates: int,
    **extra: object,
) -> None:
    """Store one scenario's figures (`fault`: what was done; `injected`: how many times)."""
    FAULTS_RESULT.parent.mkdir(parents=True, exist_ok=True)
    with open(FAULTS_RESULT.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = json.loads(FAULTS_RESULT.read_text()) if FAULTS_RESULT.exists() else {}
        table[scenario] = {
            "fault": fault,
            "injected": injected,
            "pages_checked": pages_checked,
            "pages_lost": pages_lost,
            "duplicates": duplicates,
            **extra,
        }
        FAULTS_RESULT.write_text(json.dumps(dict(sorted(table.items())), indent=2) + "\n")


@pytest.fixture
def fault_record() -> Callable[..., None]:
    return record_fault
