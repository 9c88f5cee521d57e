"""The GPU soak's smoke test on CPU: the tiny config through setup and both phases, its result
written after every phase (a run cut short keeps its numbers), then complete."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--tiny", "--device", "cpu", "--modes", "small", "--variants", "2",
    "--calls", "5", "--memory-every", "2", "--pages", "28", "--max-batch", "4",
    "--max-tokens", "16", "--stream-slots", "4", "--time-budget", "400",
]  # fmt: skip


def read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or mid-write
        return None


def test_soak_writes_each_phase_and_meets_small_targets_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.gpu_soak", *ARGS, "--out", str(out)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    partials: dict[str, dict] = {}
    while process.poll() is None:
        result = read(out)
        if result is not None and not result["complete"]:
            partials[result["phase_reached"]] = result
        time.sleep(0.05)
    log = process.stdout.read() if process.stdout else ""
    assert process.returncode == 0, log[-3000:]

    # Phase (a) is written before the stream starts: its numbers survive a run cut there.
    calls = partials["calls"]
    assert calls["targets_met"] is False and "stream" not in calls
    assert calls["calls"] >= 5 and calls["pages"] > 0 and calls["crashes"] == 0
    assert set(calls["setup_s"]) == {"model_build", "eos_probe", "warm_up"}
    phase_a = calls["generate_calls"]
    assert phase_a["calls"] == 5 - 1  # the warm-up call is setup's
    assert 0 < phase_a["call_s"]["p50"] <= phase_a["call_s"]["p95"] <= phase_a["call_s"]["max"]
    assert phase_a["mean_pages_per_call"] >= 1 and phase_a["pages_per_s"] > 0
    assert 1 <= phase_a["mean_output_tokens"] <= 16
    assert phase_a["generator_after_warm_up"]["slots"] == 4  # sized by the warm-up
    assert phase_a["slots"] == 4 and phase_a["replacements_during_calls"] == 0
    assert calls["host_rss_growth_mib"] is not None
    trace = calls["memory"]["trace"]  # read every 2 calls: the numbers a leak would show in
    assert [row["calls"] for row in trace] == list(range(2, calls["calls"] + 1, 2))
    assert all(row["host_rss_mib"] > 0 and row["gpu_allocated_gib"] is None for row in trace)

    final = read(out)
    assert final is not None and final["complete"] and final["phase_reached"] == "done"
    assert final["targets_met"] and final["crashes"] == 0
    assert final["calls"] >= 5 and final["pages"] >= 28
    stream = final["stream"]
    assert stream["pages"] == 28 - calls["pages"] > 0 and stream["errors"] == 0
    assert stream["pages_per_s"] > 0 and 1 <= stream["mean_output_tokens"] <= 16
    assert stream["replaced_generator"] is False  # the stream decodes on phase (a)'s generator
    assert final["generate_calls"] == phase_a  # earlier phases' numbers are kept, not redone
    for field in ("gpu", "oom_recovered", "gpu_mem_growth_gib", "duration_s", "finish_reasons"):
        assert field in final
