"""The parity command against the golden set of the official implementation (a copy of
`../shared/reference/parity` in `tests/data/reference/parity`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from models.deepseek_ocr.parity import GoldenSet, Tolerance, compare
from tests.conftest import PARITY_DIR, REPO_ROOT

GOLDEN_DIR = PARITY_DIR

needs_golden = pytest.mark.skipif(
    not (GOLDEN_DIR / "index.json").is_file(), reason=f"no golden set at {GOLDEN_DIR}"
)


def run_parity_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "models.deepseek_ocr.parity", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def assert_every_stored_tensor_passes(payload: dict, cases: list[str]) -> None:
    golden = GoldenSet(GOLDEN_DIR)
    failed = [item for item in payload["items"] if not item["passed"]]
    assert payload["passed"] and not failed, failed
    checked = {(item["case"], item["item"]) for item in payload["items"]}
    for case in cases:
        stored = set(golden.case(case)["tensors"])
        assert {(case, name) for name in stored} <= checked
    assert ("weights", "sha256") in checked


@needs_golden
def test_tiny_and_small_cases_pass_parity() -> None:
    """Tiny and Small, with every tap from SAM to the logits, in about a minute on 2 cores."""
    completed = run_parity_command(str(GOLDEN_DIR), "--cases", "A_tiny,B_small", "--json")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert_every_stored_tensor_passes(json.loads(completed.stdout), ["A_tiny", "B_small"])


@needs_golden
@pytest.mark.slow
def test_every_case_of_the_golden_set_passes_parity() -> None:
    completed = run_parity_command(str(GOLDEN_DIR))
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1].endswith("items pass")
    assert "FAIL" not in completed.stdout


@needs_golden
def test_unknown_case_is_refused_before_any_work() -> None:
    completed = run_parity_command(str(GOLDEN_DIR), "--cases", "A_tiny,Z_huge")
    assert completed.returncode == 2
    assert "Z_huge" in completed.stderr


def test_help_describes_the_command() -> None:
    completed = run_parity_command("--help")
    assert completed.returncode == 0
    assert "--cases" in completed.stdout and "--json" in completed.stdout


def test_compare_applies_atol_plus_rtol_and_requires_matching_infinities() -> None:
    tolerance = Tolerance(atol=1e-4, rtol=1e-4)
    golden = torch.tensor([1.0, -float("inf"), 100.0])
    assert compare(
        "c", "x", torch.tensor([1.0 + 9e-5, -float("inf"), 100.0 + 0.0100]), golden, tolerance
    ).passed
    assert not compare(
        "c", "x", torch.tensor([1.0 + 2e-4, -float("inf"), 100.0]), golden, tolerance
    ).passed
    unbanned = compare("c", "x", torch.tensor([1.0, 0.0, 100.0]), golden, tolerance)
    assert not unbanned.passed and unbanned.max_abs == float("inf")
    wrong_shape = compare("c", "x", torch.zeros(2), golden, tolerance)
    assert not wrong_shape.passed and "shape" in wrong_shape.detail
    assert compare("c", "ids", [1, 2], [1, 2], Tolerance(exact=True)).passed
    assert not compare("c", "ids", [1, 2], [1, 3], Tolerance(exact=True)).passed


@needs_golden
def test_tolerances_are_read_from_the_set() -> None:
    golden = GoldenSet(GOLDEN_DIR)
    spec = golden.index["tolerances"][golden.index["dtype"]]
    assert golden.tolerance("gen_ids") == Tolerance(exact=True)
    assert golden.tolerance("tap.layer1") == Tolerance(
        atol=spec["tap.layer"]["atol"], rtol=spec["tap.layer"]["rtol"]
    )
    assert golden.tolerance("tap.sam.global").atol == spec["tap.sam"]["atol"]
    assert golden.tolerance("tf_logits").atol == spec["logits"]["atol"]
