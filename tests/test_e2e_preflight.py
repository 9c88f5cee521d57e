"""The end-to-end benchmark checks, before it starts anything, that the pipeline can run where it
is: on a lent GPU machine a wheel left out of `bench.e2e_wheels` used to fail a minute into the
run, after the private PostgreSQL, the Prefect server and the GPU worker had started."""

from __future__ import annotations

import os
import sys

import pytest

from bench.e2e_gpu import RUN_ENV, cores_left_after, main, preflight
from infra.settings import parse_core_list
from models.orientation import shared_detector


def test_the_pipeline_can_run_here() -> None:
    assert preflight() is None


def test_a_missing_package_is_named_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [*RUN_ENV, "PREFECT_HOME"]:  # the run sets them; monkeypatch puts them back
        monkeypatch.delenv(name, raising=False)
    shared_detector.cache_clear()  # a detector built earlier would hide the missing package
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # as if its wheel were absent
    out = tmp_path / "e2e_gpu.json"

    assert main(["--device", "cpu", "--tiny", "--out", str(out)]) == 2

    assert "rapidocr_onnxruntime" in capsys.readouterr().err
    assert not out.exists()  # nothing ran


def test_the_worker_keeps_whole_cores_from_the_cpu_workers() -> None:
    """`--worker-cores`: the CPU workers' list leaves out the first cores, siblings and all."""
    available = os.sched_getaffinity(0)
    assert cores_left_after(0) is None
    assert cores_left_after(len(available)) is None  # nothing would be left for the CPU workers
    if (kept_one := cores_left_after(1)) is not None:  # None: one core, its siblings all
        left = parse_core_list(kept_one)
        assert left < available and min(available) not in left
