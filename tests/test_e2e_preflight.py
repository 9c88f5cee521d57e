"""The end-to-end benchmark checks, before it starts anything, that the pipeline can run where it
is: on a lent GPU machine a wheel left out of `bench.e2e_wheels` used to fail a minute into the
run, after the private PostgreSQL, the Prefect server and the GPU worker had started."""

from __future__ import annotations

import sys

import pytest

from bench.e2e_gpu import RUN_ENV, main, preflight
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
