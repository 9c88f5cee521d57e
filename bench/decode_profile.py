"""Where a DeepSeek-OCR decode step's time goes on one GPU: eager against CUDA graphs.

    python3 -m bench.decode_profile [--batches 128,512] [--steps 64] [--trace-dir DIR]

Full-size architecture, random bf16 weights, Base-mode pages (bench/gpu_throughput.py's
synthetic variants). Per batch size and decode path: milliseconds per decode step (a run with
`1 + steps` output tokens minus a run with one) against the bandwidth roofline's step time.
Then a torch.profiler table of prefill plus `--profile-steps` decode steps per path at the
largest batch (vision encoded beforehand, outside the profile): the kernels by GPU time and the
host operators by CPU time, which tells launch-bound (GPU idle between small kernels) from
bandwidth-bound steps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.gpu_throughput import H200_BANDWIDTH, page_variants, settings_for, timed_generate
from bench.model_gpu import build_random_model, decode_roofline_tokens_per_s
from infra.vocabulary import Mode
from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.generation import generate
from models.deepseek_ocr.generation_types import encode_pages


def step_ms(model, pages, steps: int, cuda_graphs: bool) -> float:
    """Milliseconds per decode step: a run of `1 + steps` tokens minus a run of one."""
    batch = len(pages)
    first = timed_generate(model, pages, settings_for(1, batch, cuda_graphs))
    full = timed_generate(model, pages, settings_for(1 + steps, batch, cuda_graphs))
    return (full - first) * 1000 / steps


def profile_table(model, pages, steps: int, cuda_graphs: bool, trace: Path | None) -> str:
    """Profiler tables of prefill plus `steps` decode steps (vision encoded beforehand)."""
    settings = settings_for(1 + steps, len(pages), cuda_graphs)
    spans = encode_pages(model, pages)
    generate(model, pages, settings, vision_spans=spans)  # warm-up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(model, pages, settings, vision_spans=spans)
        torch.cuda.synchronize()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    averages = prof.key_averages()
    return "\n".join(
        [
            averages.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60),
            averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="128,512")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--profile-steps", type=int, default=16)
    parser.add_argument("--paths", default="eager,graph", help="decode paths to profile")
    parser.add_argument("--trace-dir", type=Path, help="write chrome traces here")
    args = parser.parse_args()
    config = DeepseekOcrConfig()
    model = build_random_model(config, torch.device("cuda"))
    variants = page_variants(Mode.BASE, 32, seed=0)
    batches = [int(b) for b in args.batches.split(",")]
    with torch.inference_mode():
        generate(model, variants[:2], settings_for(4, 2))  # kernels, allocator
        print(f"{'batch':>5} {'path':>6} {'ms/step':>8} {'roofline ms':>11} {'tok/s':>8}")
        for batch in batches:
            pages = [variants[i % len(variants)] for i in range(batch)]
            context = len(pages[0].input_ids) + args.steps // 2
            roof_ms = (
                batch * 1000 / decode_roofline_tokens_per_s(config, batch, context, H200_BANDWIDTH)
            )
            for cuda_graphs in (False, True):
                ms = step_ms(model, pages, args.steps, cuda_graphs)
                path = "graph" if cuda_graphs else "eager"
                print(f"{batch:5d} {path:>6} {ms:8.2f} {roof_ms:11.2f} {batch * 1000 / ms:8.0f}")
        pages = [variants[i % len(variants)] for i in range(batches[-1])]
        for path in args.paths.split(","):
            cuda_graphs = path == "graph"
            trace = args.trace_dir / f"decode_{path}.json" if args.trace_dir else None
            print(f"\n== profile: {path}, batch {len(pages)}, {args.profile_steps} steps ==")
            print(profile_table(model, pages, args.profile_steps, cuda_graphs, trace))


if __name__ == "__main__":
    main()
