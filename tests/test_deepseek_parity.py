"""The parity command against the golden set of the official implementation (a copy of
`../shared/reference/parity` in `tests/data/reference/parity`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from models.deepseek_ocr.parity import (
    GoldenSet,
    Tolerance,
    compare,
    decided_steps,
    keep_decided_steps,
)
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
    assert "--device" in completed.stdout and "bfloat16" in completed.stdout


@needs_golden
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_cuda_without_a_gpu_is_refused_before_any_work() -> None:
    completed = run_parity_command(str(GOLDEN_DIR), "--device", "cuda", "--dtype", "bfloat16")
    assert completed.returncode == 2
    assert "CUDA is not available" in completed.stderr


@needs_golden
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bfloat16 on cuda)")
def test_every_case_passes_bfloat16_parity_on_the_gpu() -> None:
    """The production configuration: bfloat16 weights and views on CUDA, CUDA-graph decoding."""
    completed = run_parity_command(
        str(GOLDEN_DIR), "--device", "cuda", "--dtype", "bfloat16", "--json"
    )
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-3000:]
    assert_every_stored_tensor_passes(
        json.loads(completed.stdout), GoldenSet(GOLDEN_DIR).case_names
    )


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


@needs_golden
def test_bfloat16_tolerances_come_from_the_set_with_its_float32_exact_items() -> None:
    golden = GoldenSet(GOLDEN_DIR, "bfloat16")
    table = golden.index["tolerances"]["bfloat16"]
    activation, logits = Tolerance(**table["vision_span"]), Tolerance(**table["logits"])
    assert activation.rel_l2 is not None and logits.max_abs is not None
    assert golden.tolerance("vision_span") == activation
    # Taps the bfloat16 table has no own entry for: activations as the span, the rest as logits.
    assert golden.tolerance("tap.sam.global") == activation
    assert golden.tolerance("tap.layer1") == activation
    for item in ("tap.final_norm", "tap.lm_head", "tf_logits", "gen_logits", "logits_prompt_last"):
        assert golden.tolerance(item) == logits
    for item in ("input_ids", "images_seq_mask", "gen_ids"):
        assert golden.tolerance(item) == Tolerance(exact=True)
    float32 = golden.index["tolerances"]["float32"]
    assert golden.tolerances["pixel_views"] == float32["pixel_views"]
    assert golden.near_tie_margin is not None and GoldenSet(GOLDEN_DIR).near_tie_margin is None


def test_whole_tensor_bounds_judge_relative_l2_cosine_and_max_abs() -> None:
    generator = torch.Generator().manual_seed(0)
    golden = torch.randn(64, 256, generator=generator, dtype=torch.float64)
    noise = torch.randn(64, 256, generator=generator, dtype=torch.float64)
    span = Tolerance(rel_l2=0.04, cosine=0.999)
    close = compare("c", "vision_span", golden + 0.01 * noise, golden, span)
    assert close.passed and close.rel_l2 is not None and 0.008 < close.rel_l2 < 0.012
    assert close.cosine is not None and close.cosine > 0.9999
    assert not compare("c", "vision_span", golden + 0.06 * noise, golden, span).passed
    swapped = torch.cat([golden[32:], golden[:32]])  # same norm, unrelated rows: cosine ~0
    assert not compare("c", "vision_span", swapped, golden, Tolerance(cosine=0.999)).passed
    logits = Tolerance(rel_l2=0.05, max_abs=0.25)
    spike = golden.clone()
    spike[0, 0] += 0.3  # one element off: tiny relative L2, but over the max-abs bound
    assert not compare("c", "tf_logits", spike, golden, logits).passed
    banned = golden.clone()
    banned[0, 0] = -float("inf")
    assert compare("c", "gen_scores", banned, banned, logits).passed
    assert not compare("c", "gen_scores", golden, banned, logits).passed
    assert not compare("c", "tf_logits", golden * float("nan"), golden, logits).passed


def test_near_tie_cut_keeps_ids_before_the_first_small_margin_and_logits_while_ids_agree() -> None:
    margins = [0.3, 0.2, 0.05, 0.4, 0.5]
    golden_ids = [7, 8, 9, 10, 11]
    assert decided_steps(golden_ids, golden_ids, margins, 0.1) == (2, 5)
    assert decided_steps([7, 8, 9, 3, 3], golden_ids, margins, 0.1) == (2, 3)
    assert decided_steps([7, 8], golden_ids, margins, 0.1) == (2, 2)  # stopped early (EOS)
    assert decided_steps(golden_ids, golden_ids, [0.2] * 5, 0.1) == (5, 5)

    def cut(port_ids: list[int]) -> tuple[dict, dict, dict]:
        logits = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)
        port = {"gen_ids": torch.tensor(port_ids), "gen_logits": logits.clone()}
        stored = {"gen_ids": torch.tensor(golden_ids), "gen_logits": logits.clone()}
        return port, stored, keep_decided_steps(port, stored, margins, 0.1)

    port, stored, details = cut([7, 8, 5, 5, 5])  # differs at the near-tie step: still a pass
    assert compare("c", "gen_ids", port["gen_ids"], stored["gen_ids"], Tolerance(True)).passed
    assert len(port["gen_ids"]) == 2 and len(stored["gen_logits"]) == 2
    assert "first 2 of 5 steps" in details["gen_ids"] and "step 2" in details["gen_logits"]
    port, stored, _ = cut([7, 5, 9, 10, 11])  # differs before the near tie: a failure
    assert not compare("c", "gen_ids", port["gen_ids"], stored["gen_ids"], Tolerance(True)).passed
    assert len(port["gen_logits"]) == len(stored["gen_logits"]) == 1
