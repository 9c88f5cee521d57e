"""DeepSeek-OCR 2 pages/s on one GPU: the port's engine path per budget, v1 beside it, and
transformers' own `generate` as the reference, all in one run.

    python3 -m bench.gpu_throughput --model deepseek-ocr-2                      # ~4 min, H200
    python3 -m bench.gpu_throughput --model deepseek-ocr-2 --tiny --device cpu  # smoke test

The full-size OCR-2 architecture (`models.deepseek_ocr2.config.official_config`) is built as
transformers' `DeepseekOcr2ForConditionalGeneration` with random bf16 weights at the scales
bench/model_gpu.py gives v1, saved by transformers and loaded by the port's strict loader, so
both paths hold the same weights. Pages are a synthetic A4 page at 150 dpi in slightly
different versions, prepared by transformers' image processor in two budgets: the global view
alone (257 vision tokens) and the global view with the crops the processor's tiling gives
(6 for A4: 1,121 tokens). Every page decodes exactly `--tokens` tokens on both paths:

* port: `models.deepseek_ocr.generation.generate` (the engine's path: batched vision encoding,
  continuous-batching decode with CUDA graphs and the official 20/50 n-gram ban), EOS ignored,
  at `--batch` pages (256); measured as gpu_throughput.py measures v1;
* transformers: `generate` (greedy, `min_new_tokens` = `max_new_tokens`, no n-gram ban: less
  work than the port's path does), at a few batch sizes (halved after an out-of-memory); its
  best batch is the reference;
* v1 (`--v1-modes`, default Base and Gundam) through the same port path, when time is left.

Runs are skipped once `--time-budget` seconds are spent (a transformers run is also skipped
when its predicted time does not fit). Writes bench/results/gpu_throughput_ocr2.json.
Imports no pipeline package (pydantic, SQLAlchemy, Prefect, PyMuPDF) and no tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DeepseekOcr2ForConditionalGeneration
from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import (
    DeepseekOcr2ImageProcessorPil,
)

from bench.gpu_throughput import (
    free_memory,
    gpu_run_info,
    measure,
    page_variants,
    print_rows,
    sync,
)
from bench.model_gpu import (
    BOS_ID,
    IMAGE_TOKEN_ID,
    SUFFIX_IDS,
    build_random_model,
    fill_scaled_,
    synthetic_page,
)
from infra.vocabulary import Mode
from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.resident import resident_generator
from models.deepseek_ocr2.config import official_config, tiny_config
from models.deepseek_ocr2.modeling import DeepseekOcr2ForCausalLM
from models.deepseek_ocr2.processor import Ocr2PageInputs, budget_views, page_from_ids

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_PATH = REPO_ROOT / "bench" / "results" / "gpu_throughput_ocr2.json"
# OCR-2 budgets measured: the rung that selects them (`models.deepseek_ocr2.geometry`).
BUDGETS = {"global": Mode.TINY, "crops": Mode.GUNDAM}
MODEL = "deepseek-ocr-2"
# Seconds a v1 row takes on an H200 (500 tokens, batch 256, both runs), kept for them at the end.
V1_SECONDS_PER_MODE = 20.0


@dataclass
class ReferenceRow:
    """One `generate` call of transformers on `batch_size` pages of one budget."""

    mode: str  # the budget's label, as in the port's rows
    batch_size: int
    vision_tokens_per_page: int
    output_tokens_per_page: int
    seconds: float | None = None
    pages_per_s: float | None = None
    output_tokens_per_s: float | None = None
    peak_gpu_mem_gib: float | None = None
    status: str = "ok"  # ok, oom, skipped (would not fit the time budget), cut (ran out of it)


@torch.no_grad()
def build_models(
    tiny: bool, device: torch.device
) -> tuple[DeepseekOcr2ForCausalLM, DeepseekOcr2ForConditionalGeneration]:
    """transformers' model with random weights (bf16 on a GPU, float32 on CPU, where bf16
    convolutions are slow), and the port's model with the same weights (saved by transformers
    in the original layout, loaded strictly)."""
    config = tiny_config() if tiny else official_config()
    config.text_config.pad_token_id = 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        reference = DeepseekOcr2ForConditionalGeneration(config)
    reference = reference.to(dtype).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    for name, parameter in reference.named_parameters():
        # Fused experts are (experts, out, in): the fan-in is a single expert's.
        per_expert = parameter.shape[1:] if parameter.dim() == 3 else None
        fill_scaled_(parameter.data, name.replace("separator", "seperator"), generator, per_expert)
    with tempfile.TemporaryDirectory(prefix="ocr2-random-") as directory:
        reference.save_pretrained(directory)
        ours = DeepseekOcr2ForCausalLM.from_pretrained(directory, device=device, dtype=dtype)
    return ours, reference


def budget_pages(mode: Mode, count: int, seed: int) -> list[Ocr2PageInputs]:
    """`count` versions of the synthetic page in the budget `mode` names, pixels slightly
    different (so sequences route to different experts as different pages would)."""
    global_view, tiles = budget_views(DeepseekOcr2ImageProcessorPil(), synthetic_page(), mode)
    base = page_from_ids(
        global_view, tiles, mode, [], SUFFIX_IDS, bos_id=BOS_ID, image_token_id=IMAGE_TOKEN_ID
    )
    generator = torch.Generator().manual_seed(seed)
    pages = []
    for _ in range(count):
        noise = torch.randn(base.global_view.shape, generator=generator) * 0.02
        tiles = base.tiles + torch.randn(base.tiles.shape, generator=generator) * 0.02
        pages.append(replace(base, global_view=base.global_view + noise, tiles=tiles))
    return pages


def reference_inputs(
    pages: list[Ocr2PageInputs], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """transformers' model inputs for pages of one budget (equal lengths: no padding)."""
    input_ids = torch.stack([page.input_ids for page in pages]).to(device)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.stack([p.global_view for p in pages]).to(device, dtype),
        "num_local_patches": torch.tensor([len(p.tiles) for p in pages], device=device),
    }
    if any(len(page.tiles) for page in pages):
        local = torch.cat([page.tiles for page in pages])
        inputs["pixel_values_local"] = local.to(device, dtype)
    return inputs


@torch.inference_mode()
def reference_run(
    reference: DeepseekOcr2ForConditionalGeneration,
    pages: list[Ocr2PageInputs],
    row: ReferenceRow,
    max_seconds: float,
) -> ReferenceRow:
    """transformers' `generate` on the pages, forced to exactly `row.output_tokens_per_page`;
    a call still running after `max_seconds` is stopped (`cut`, no rate claimed)."""
    device = reference.lm_head.weight.device
    inputs = reference_inputs(pages, device, reference.lm_head.weight.dtype)
    tokens = row.output_tokens_per_page
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    started = time.perf_counter()
    output = reference.generate(
        **inputs,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        max_time=max(max_seconds, 1.0),
    )
    sync(device)
    seconds = time.perf_counter() - started
    generated = output.shape[1] - inputs["input_ids"].shape[1]
    row.seconds = seconds
    if generated != tokens:
        row.status = f"cut after {generated} tokens"
        return row
    row.pages_per_s = len(pages) / seconds
    row.output_tokens_per_s = len(pages) * tokens / seconds
    if device.type == "cuda":
        row.peak_gpu_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def reference_rows(
    reference: DeepseekOcr2ForConditionalGeneration,
    label: str,
    pages: list[Ocr2PageInputs],
    args: argparse.Namespace,
    deadline: float,
) -> list[ReferenceRow]:
    """transformers at the given batch sizes, largest first (its decode step costs about the
    same at any batch, so the largest that fits is its best); an out-of-memory halves the
    batch, and a run whose predicted time (the last run's, scaled by the square root of the
    batch ratio) would pass the deadline is skipped."""
    rows: list[ReferenceRow] = []
    last: ReferenceRow | None = None
    for batch in args.reference_batches:
        if any(row.status == "oom" and row.batch_size <= batch for row in rows):
            continue  # known not to fit
        while batch >= 1:
            row = ReferenceRow(label, batch, pages[0].n_placeholders, args.tokens)
            predicted = last.seconds * math.sqrt(batch / last.batch_size) if last else 0.0
            if time.perf_counter() + predicted > deadline:
                row.status = "skipped"
                rows.append(row)
                print(f"transformers {label} batch {batch}: skipped (time budget)", flush=True)
                break
            try:
                batch_pages = [pages[i % len(pages)] for i in range(batch)]
                row = reference_run(reference, batch_pages, row, deadline - time.perf_counter())
                rows.append(row)
                if row.status != "ok":
                    print(f"transformers {label} batch {batch}: {row.status}", flush=True)
                    return rows
                last = row
                print(
                    f"transformers {label:7} batch {batch:4d}: {last.pages_per_s:8.2f} pages/s "
                    f"{last.output_tokens_per_s:9.0f} tok/s ({last.seconds:.1f} s)",
                    flush=True,
                )
                break
            except torch.OutOfMemoryError:
                rows.append(replace(row, status="oom"))
                print(f"transformers {label} batch {batch}: out of memory, halving", flush=True)
                free_memory()
                batch //= 2
    return rows


def port_row(model, label: str, pages: list, args: argparse.Namespace) -> dict[str, Any] | None:
    """The port's engine path on `args.batch` pages, halving after an out-of-memory."""
    batch = args.batch
    failed: list[int] = []
    while batch >= 1:
        try:
            row = measure(
                model,
                label,
                [pages[i % len(pages)] for i in range(batch)],
                tokens=args.tokens,
                bandwidth=args.bandwidth,
            )
            row.out_of_memory_at = failed or None
            print_rows([row])
            return asdict(row) | {"vision_tokens_per_page": pages[0].n_placeholders}
        except torch.OutOfMemoryError:
            failed.append(batch)
            free_memory()
            batch //= 2
    return None


def release(model) -> None:
    """Give back the model's resident generator (its cache and CUDA graphs) before the next
    model runs."""
    resident_generator(model).release()
    free_memory()


def progress(started: float, message: str) -> None:
    print(f"[{time.perf_counter() - started:5.0f} s] {message}", flush=True)


def best(rows: list[ReferenceRow], label: str) -> ReferenceRow | None:
    done = [row for row in rows if row.mode == label and row.status == "ok"]
    return max(done, key=lambda row: row.pages_per_s or 0.0, default=None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole OCR-2 benchmark; returns (and writes) the result."""
    started = time.perf_counter()
    deadline = started + args.time_budget
    device = torch.device(args.device)
    ours, reference = build_models(args.tiny, device)
    progress(started, f"OCR-2 models built on {device}; port rows at batch {args.batch}")
    pages = {label: budget_pages(mode, args.variants, seed=i) for i, (label, mode) in
             enumerate(BUDGETS.items())}  # fmt: skip

    results: list[dict[str, Any]] = []
    with torch.inference_mode():
        if device.type == "cuda":  # kernels, allocator, the first graphs
            measure(ours, "warm-up", pages["global"][:2], tokens=4, bandwidth=args.bandwidth)
        for label in BUDGETS:
            if time.perf_counter() > deadline:
                print(f"port {label}: skipped (time budget)", flush=True)
                continue
            row = port_row(ours, label, pages[label], args)
            if row is not None:
                results.append({"model": MODEL, "path": "port", **row})
        release(ours)
        progress(started, f"transformers generate, batches {args.reference_batches}")
        references: list[ReferenceRow] = []
        v1_modes = [Mode(m) for m in args.v1_modes.split(",") if m.strip()]
        v1_reserve = V1_SECONDS_PER_MODE * len(v1_modes) * (not args.tiny)
        for index, label in enumerate(BUDGETS):
            # An equal share of what is left, less the v1 rows' time, to each budget.
            left = deadline - v1_reserve - time.perf_counter()
            label_deadline = time.perf_counter() + left / (len(BUDGETS) - index)
            references += reference_rows(reference, label, pages[label], args, label_deadline)
        results += [{"model": MODEL, "path": "transformers", **asdict(r)} for r in references]
    reference_config = {
        name: getattr(reference.config, name, None)
        for name in ("_attn_implementation", "_experts_implementation")
    }
    del reference
    free_memory()

    if v1_modes and time.perf_counter() < deadline:
        progress(started, f"v1 rows: {', '.join(map(str, v1_modes))}")
        v1 = build_random_model(
            DeepseekOcrConfig.tiny() if args.tiny else DeepseekOcrConfig(), device
        )
        with torch.inference_mode():
            for mode in v1_modes:
                if time.perf_counter() > deadline:
                    print(f"v1 {mode}: skipped (time budget)", flush=True)
                    continue
                row = port_row(v1, str(mode), page_variants(mode, args.variants, seed=7), args)
                if row is not None:
                    results.append({"model": "deepseek-ocr", "path": "port", **row})
        release(v1)

    speedups = {}
    for label in BUDGETS:
        port = next((r for r in results if r["path"] == "port" and r["mode"] == label), None)
        ref = best(references, label)
        if port and ref:
            speedups[label] = {
                "port_pages_per_s": port["pages_per_s"],
                "transformers_best_pages_per_s": ref.pages_per_s,
                "transformers_best_batch": ref.batch_size,
                "speedup": port["pages_per_s"] / ref.pages_per_s,
            }
    result = {
        **gpu_run_info(device, "bench.gpu_throughput"),
        "model": MODEL,
        "transformers": transformers.__version__,
        "config": "tiny" if args.tiny else "official DeepSeek-OCR 2 sizes, random bf16 weights",
        "output_tokens_per_page": args.tokens,
        "budgets": {label: str(mode) for label, mode in BUDGETS.items()},
        "reference": (
            "transformers DeepseekOcr2ForConditionalGeneration.generate, greedy, "
            "min_new_tokens = max_new_tokens, no n-gram ban, one call per batch"
        ),
        "reference_implementations": {
            "attention": reference_config.get("_attn_implementation"),
            "experts": reference_config.get("_experts_implementation"),
        },
        "port": "models.deepseek_ocr.generation.generate, CUDA graphs, n-gram ban 20/50",
        "speedup_vs_transformers_best": speedups,
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(speedups, indent=1))
    print(f"wrote {args.out} after {result['seconds']} s")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The OCR-2 run's own options (gpu_throughput.py's parser carries them)."""
    parser.add_argument(
        "--reference-batches",
        type=lambda text: [int(b) for b in text.split(",")],
        default=[128, 64],
        help="OCR-2: transformers batch sizes to try, in order",
    )
    parser.add_argument("--v1-modes", default="base,gundam", help="OCR-2: v1 rows beside it")
    parser.add_argument(
        "--time-budget", type=float, default=210.0, help="OCR-2: seconds for the whole run"
    )


PORT_BATCH = 256  # the port's pages per call unless `--batch` says otherwise


def tiny_defaults(args: argparse.Namespace) -> None:
    """Sizes that make `--tiny --device cpu` a smoke test of well under a minute."""
    args.tokens = min(args.tokens, 4)
    args.batch = min(args.batch, 2)
    args.reference_batches = [2]
    args.variants = min(args.variants, 2)


__all__ = ["PORT_BATCH", "RESULT_PATH", "add_arguments", "run", "tiny_defaults"]
