"""Where a page's GPU time goes before decoding starts, and what the KV cache's size costs.

    python3 -m bench.engine_profile [--views 32] [--pages 512] [--tokens 1000]

Full-size architecture, random bf16 weights, the synthetic pages of `bench.gpu_throughput`.

1. Vision stages per view (SAM's windowed and global blocks, its neck, CLIP, the projector) for
   `--views` Base views (1024 px) and as many Gundam tiles (640 px), each stage timed alone on
   the previous stage's output.
2. A page's whole prefill (`generate` with one output token: vision, prompt, first token) per
   mode, minus its vision encoding: the decoder's share.
3. A torch.profiler table of one Base encoding: the kernels by GPU time.
4. `--ab-capacity`: the same `generate` call (`--pages` Base pages, `--tokens` tokens) with the
   resident cache's positions rounded up to `CAPACITY_STEP` (the default) and sized exactly,
   alternated A-B-A-B in one process, so any cost of the larger cache shows in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.gpu_throughput import gpu_run_info, page_variants, settings_for, sync, timed_generate
from bench.model_gpu import build_random_model
from infra.vocabulary import Mode
from models.deepseek_ocr import resident
from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.generation import generate
from models.deepseek_ocr.generation_types import encode_pages
from models.deepseek_ocr.vision import pixel_values_for

DEVICE = torch.device("cuda")


def timed_ms(work: Callable[[], object], repeats: int = 3) -> float:
    """Median wall milliseconds of `work`, device work included, after one warm-up call."""
    work()
    times = []
    for _ in range(repeats):
        sync(DEVICE)
        started = time.perf_counter()
        work()
        sync(DEVICE)
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


def vision_stages(model, views: torch.Tensor) -> dict[str, float]:
    """Milliseconds per view of each vision stage, each fed the previous stage's real output."""
    encoder = model.model
    sam = encoder.sam_model
    count = len(views)
    stages: dict[str, float] = {}
    hidden = sam.patch_embed(views)
    stages["sam_patch_embed"] = timed_ms(lambda: sam.patch_embed(views)) / count
    windowed = [b for b in sam.blocks if b.window_size]
    global_blocks = [b for b in sam.blocks if not b.window_size]
    stages[f"sam_windowed_blocks_x{len(windowed)}"] = (
        timed_ms(lambda: windowed[0](hidden)) * len(windowed) / count
    )
    stages[f"sam_global_blocks_x{len(global_blocks)}"] = (
        timed_ms(lambda: global_blocks[0](hidden)) * len(global_blocks) / count
    )
    attention = global_blocks[0].attn
    normed = global_blocks[0].norm1(hidden)
    stages["sam_global_attention_only_x1"] = timed_ms(lambda: attention(normed)) / count
    height, width = hidden.shape[1:3]
    qkv = attention.qkv(normed).reshape(count, height * width, 3, attention.num_heads, -1)
    query, key = qkv.permute(2, 0, 3, 1, 4)[:2]
    stages["sam_global_rel_pos_extend_x1"] = (
        timed_ms(lambda: attention._with_relative_positions(query, key, height, width)) / count
    )
    features = sam(views)
    stages["sam_total"] = timed_ms(lambda: sam(views)) / count
    stages["clip_total"] = timed_ms(lambda: encoder.vision_model(features)) / count
    stages["view_features_total"] = timed_ms(lambda: encoder.view_features(views)) / count
    return {name: round(ms, 3) for name, ms in stages.items()}


def prefill_split(model, mode: Mode, pages: int) -> dict[str, float]:
    """Per page: whole prefill (`generate`, one token) and its vision encoding alone."""
    inputs = [page_variants(mode, 8, seed=1)[i % 8] for i in range(pages)]
    whole = timed_ms(lambda: generate(model, inputs, settings_for(1, pages)), repeats=2)
    vision = timed_ms(lambda: encode_pages(model, inputs), repeats=2)
    return {
        "prefill_ms_per_page": round(whole / pages, 3),
        "vision_ms_per_page": round(vision / pages, 3),
        "decoder_prefill_ms_per_page": round((whole - vision) / pages, 3),
    }


def kernel_table(model, views: torch.Tensor) -> str:
    model.model.view_features(views)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.model.view_features(views)
        sync(DEVICE)
    return prof.key_averages().table(
        sort_by="self_cuda_time_total" if DEVICE.type == "cuda" else "self_cpu_time_total",
        row_limit=20,
        max_name_column_width=70,
    )


def capacity_ab(model, pages: int, tokens: int) -> list[dict]:
    """The same call with rounded (A) and exact (B) cache positions, A-B-A-B."""
    inputs = [page_variants(Mode.BASE, 32, seed=0)[i % 32] for i in range(pages)]
    settings = settings_for(tokens, pages)
    rounded = resident.CAPACITY_STEP
    rows = []
    for step in (rounded, 1, rounded, 1):
        resident.CAPACITY_STEP = step
        resident.resident_generator(model).release()
        seconds = timed_generate(model, inputs, settings)
        generator = resident.resident_generator(model).generator
        rows.append(
            {
                "capacity_step": step,
                "capacity": generator.cache.capacity if generator else None,
                "pages_per_s": round(pages / seconds, 2),
                "seconds": round(seconds, 2),
            }
        )
        print(rows[-1], flush=True)
    resident.CAPACITY_STEP = rounded
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, default=32)
    parser.add_argument("--prefill-pages", type=int, default=128)
    parser.add_argument("--pages", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--ab-capacity", action="store_true")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    parser.add_argument("--tiny", action="store_true", help="tiny config (smoke test on CPU)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = device = torch.device(args.device)
    config = DeepseekOcrConfig.tiny() if args.tiny else DeepseekOcrConfig()
    model = build_random_model(config, device)
    result: dict = gpu_run_info(device, "bench.engine_profile")
    with torch.inference_mode():
        generate(model, page_variants(Mode.BASE, 2, seed=0), settings_for(4, 2))  # warm-up
        base = torch.stack([p.global_view for p in page_variants(Mode.BASE, args.views, 0)])
        gundam = page_variants(Mode.GUNDAM, args.views, seed=0)
        tiles = torch.cat([p.tiles for p in gundam])[: args.views]
        result["vision_ms_per_view"] = {
            "base_1024": vision_stages(model, pixel_values_for(base, model.lm_head.weight)),
            "tile_640": vision_stages(model, pixel_values_for(tiles, model.lm_head.weight)),
        }
        print(json.dumps(result["vision_ms_per_view"], indent=1), flush=True)
        result["prefill"] = {
            mode.value: prefill_split(model, mode, args.prefill_pages)
            for mode in (Mode.BASE, Mode.GUNDAM)
        }
        print(json.dumps(result["prefill"], indent=1), flush=True)
        print(kernel_table(model, pixel_values_for(base[:16], model.lm_head.weight)), flush=True)
        if args.ab_capacity:
            result["capacity_ab"] = capacity_ab(model, args.pages, args.tokens)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
