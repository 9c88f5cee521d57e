"""`python3 -m bench.gpu_throughput --model deepseek-ocr-2` as a CPU smoke test (`--tiny`): the
same code the H200 run executes, on a tiny random OCR-2 model."""

from __future__ import annotations

import json
import subprocess
import sys

from bench.gpu_throughput import RESULT_PATH, main, parse_args
from tests.conftest import REPO_ROOT


def test_ocr2_benchmark_smoke_run_writes_port_transformers_and_v1_rows(tmp_path):
    out = tmp_path / "gpu_throughput_ocr2.json"
    main(["--model", "deepseek-ocr-2", "--tiny", "--device", "cpu", "--v1-modes", "base",
          "--out", str(out)])  # fmt: skip

    result = json.loads(out.read_text())
    rows = {(row["model"], row["path"], row["mode"]): row for row in result["results"]}
    port_global = rows["deepseek-ocr-2", "port", "global"]
    port_crops = rows["deepseek-ocr-2", "port", "crops"]
    assert port_global["vision_tokens_per_page"] == 257  # A4: global view alone
    assert port_crops["vision_tokens_per_page"] == 257 + 6 * 144  # and its 6 crops
    for label in ("global", "crops"):
        reference = rows["deepseek-ocr-2", "transformers", label]
        assert reference["status"] == "ok" and reference["pages_per_s"] > 0
        assert reference["output_tokens_per_page"] == port_global["output_tokens_per_page"]
        assert result["speedup_vs_transformers_best"][label]["speedup"] > 0
    assert ("deepseek-ocr", "port", "base") in rows  # v1 beside it, same run


def test_ocr2_benchmark_imports_nothing_the_gpu_image_lacks():
    probe = "import sys, bench.gpu_throughput, bench.gpu_throughput_ocr2; "
    probe += "print(sorted({'pydantic', 'sqlalchemy', 'prefect', 'pymupdf'} & set(sys.modules)))"
    completed = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == "[]"


def test_v1_options_are_unchanged_by_the_ocr2_option():
    args = parse_args([])
    assert (args.model, args.tokens, args.out) == ("deepseek-ocr", 1000, RESULT_PATH)
    assert not hasattr(args, "reference_batches")  # OCR-2's options only with --model
    assert parse_args(["--quick"]).tokens == 200
