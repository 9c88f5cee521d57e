"""The expert paths and dtypes every GPU may take, measured on one GPU: parity and pages/s.

    python3 -m bench.gpu_portability                       # H200, ~4 min
    python3 -m bench.gpu_portability --tokens 16 --batch 4 --tiny --device cpu   # smoke

On a Hopper GPU `auto` takes PyTorch's fused grouped matmul in bfloat16; every other GPU (A100,
L40S, RTX, T4) and every other dtype takes the portable Triton kernel. Forcing
`expert_kernel=portable` here runs that path on the GPU we have. Per configuration (grouped
bf16, portable bf16, portable fp16, and portable fp32 for parity only):

- the parity command's checks on the golden set (`models.deepseek_ocr.parity`, in process),
- pages/s of `generate` per mode (bench/gpu_throughput.py's measurement: full-size architecture,
  random weights, output forced to `--tokens` per page, EOS ignored), same pages, same run.

The portable/grouped ratio for Base is taken within this run (target >= 0.7). Writes
bench/results/gpu_portability.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from bench.gpu_throughput import (
    batch_pages,
    gpu_run_info,
    measure,
    measure_halving_on_oom,
    page_variants,
)
from bench.model_gpu import add_random_model_arguments, random_model_from_args
from infra.vocabulary import Mode
from models.deepseek_ocr.generation import generate
from models.deepseek_ocr.generation_types import GenerationSettings
from models.deepseek_ocr.parity import ParityError, run_parity
from models.deepseek_ocr.resident import resident_generator

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_PATH = REPO_ROOT / "bench" / "results" / "gpu_portability.json"
GOLDEN_DIR = REPO_ROOT / "tests" / "data" / "reference" / "parity"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# (expert kernel, dtype, measure pages/s): float32 is checked for parity only (nobody serves it).
CONFIGURATIONS = (
    ("grouped", "bfloat16", True),
    ("portable", "bfloat16", True),
    ("portable", "float16", True),
    ("portable", "float32", False),
)


def parity(device: torch.device, kernel: str, dtype: str, golden_dir: Path) -> dict:
    try:
        results = run_parity(golden_dir, None, device, DTYPES[dtype], kernel)
    except ParityError as error:
        return {"passed": False, "error": str(error)}
    failed = [f"{r.case}/{r.item}" for r in results if not r.passed]
    return {"passed": not failed, "items": len(results), "failed": failed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="base,gundam")
    parser.add_argument("--tokens", type=int, default=500, help="output tokens per page")
    parser.add_argument("--batch", type=int, default=256, help="pages per measured call")
    parser.add_argument("--variants", type=int, default=16)
    parser.add_argument("--golden-dir", type=Path, default=GOLDEN_DIR)
    parser.add_argument("--no-parity", action="store_true")
    add_random_model_arguments(parser, RESULT_PATH)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model = random_model_from_args(args)
    modes = [Mode(label.strip()) for label in args.modes.split(",") if label.strip()]
    variants = {mode: page_variants(mode, args.variants, seed=i) for i, mode in enumerate(modes)}

    rows: list[dict] = []
    for kernel, dtype, timed in CONFIGURATIONS:
        checked = (
            {"passed": None} if args.no_parity else parity(device, kernel, dtype, args.golden_dir)
        )
        print(f"{kernel} {dtype}: parity {checked}", flush=True)
        if not timed:
            rows.append(
                {
                    "expert_kernel": kernel,
                    "dtype": dtype,
                    "mode": None,
                    "pages_per_s": None,
                    "parity_passed": checked["passed"],
                    "parity": checked,
                }
            )
            continue
        resident_generator(model).release()  # graphs hold the old weights' addresses
        model.to(DTYPES[dtype])
        model.set_expert_kernel(kernel)
        with torch.inference_mode():
            warm = batch_pages(variants, {}, modes[0], 2)
            generate(model, warm, GenerationSettings(max_new_tokens=4, ignore_eos=True))
            for mode in modes:
                run = partial(measure, model, str(mode), tokens=args.tokens, bandwidth=4.8e12)
                row = measure_halving_on_oom(
                    partial(batch_pages, variants, {}, mode), args.batch, run
                )
                rows.append(
                    {
                        "expert_kernel": kernel,
                        "dtype": dtype,
                        "mode": str(mode),
                        "pages_per_s": row.pages_per_s if row else None,
                        "parity_passed": checked["passed"],
                        "parity": checked,
                        "measurement": asdict(row) if row else None,
                    }
                )
                print(f"  {mode}: {rows[-1]['pages_per_s']} pages/s", flush=True)
        resident_generator(model).release()

    def pages_per_s(kernel: str, dtype: str, mode: Mode) -> float | None:
        return next(
            (
                r["pages_per_s"]
                for r in rows
                if (r["expert_kernel"], r["dtype"], r["mode"]) == (kernel, dtype, str(mode))
            ),
            None,
        )

    ratios = {}
    for mode in modes:
        grouped = pages_per_s("grouped", "bfloat16", mode)
        for dtype in ("bfloat16", "float16"):
            portable = pages_per_s("portable", dtype, mode)
            if grouped and portable:
                ratios[f"portable_{dtype}_vs_grouped_bfloat16_{mode}"] = portable / grouped
    result = {
        **gpu_run_info(device, "bench.gpu_portability"),
        "config": "tiny" if args.tiny else "official sizes, random weights",
        "tokens_per_page": args.tokens,
        "batch": args.batch,
        "baseline": "grouped bfloat16 (PyTorch's fused grouped_mm), same pages, same run",
        "ratios": ratios,
        "target": "portable bfloat16 Base >= 0.7 of grouped bfloat16 Base",
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(ratios, indent=1))
    print(f"wrote {args.out}")
    return 0 if all(r["parity_passed"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
