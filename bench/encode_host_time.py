"""How long the host takes to launch a batch's vision encoding, against the GPU's time for it.

    python3 -m bench.encode_host_time [--gundam 16] [--base 16] [--out FILE]

Full-size architecture, random bf16 weights, the synthetic pages of `bench.gpu_throughput`.
The encoding is timed twice after a warm-up, on the current stream and on a side stream: host
time from the call to its return, GPU time between events around it. Then, under
`torch.cuda.set_sync_debug_mode("error")`, the encoding runs once more, so a call in it that
synchronises the host with the GPU raises. A host time close to the GPU's does not by itself
say which bounds the other: the profile below does (time in "Command Buffer Full" is the host
waiting for the GPU's launch queue, so the GPU is the bound; on an H200 it was).
Before all that, each view shape a run can meet (every mode's view side, every encoder batch
size) is encoded twice, first use against second (`first_use`): cuDNN builds a plan for each new
attention and convolution shape, and a worker meets new shapes while its batch fills.
Last, one encoding runs under `torch.profiler`, which names the operators that take the host's
time, the kernels that take the GPU's, and counts the kernels launched (`host_ops`,
`gpu_ops`, `kernel_launches`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.gpu_throughput import gpu_run_info, page_variants
from bench.model_gpu import build_random_model
from infra.vocabulary import Mode
from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.generation_types import GenerationSettings, encode_pages, encoder_shapes


def timed_encoding(model, pages, settings, stream: torch.cuda.Stream) -> dict[str, float]:
    began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        started = time.perf_counter()
        began.record()
        encode_pages(model, pages, settings)
        ended.record()
        host_ms = (time.perf_counter() - started) * 1000
    ended.synchronize()
    return {"host_launch_ms": host_ms, "gpu_ms": began.elapsed_time(ended)}


def profiled_host_ops(model, pages, settings, top: int = 25) -> tuple[list[dict], list[dict], int]:
    """In one encoding: the operators taking the most host time (self), the kernels taking the
    most GPU time, and the number of kernels launched."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        encode_pages(model, pages, settings)
        torch.cuda.synchronize()
    averages = profile.key_averages()
    launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernel"))
    ranked = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    ops = [
        {"name": e.key, "calls": e.count, "self_host_ms": e.self_cpu_time_total / 1000}
        for e in ranked
    ]
    kernels = sorted(averages, key=lambda e: e.self_device_time_total, reverse=True)[:top]
    gpu = [
        {"name": e.key[:120], "calls": e.count, "gpu_ms": e.self_device_time_total / 1000}
        for e in kernels
    ]
    return ops, gpu, launches


def first_use_timings(model, settings) -> list[dict]:
    """Per (view side, encoder batch size): wall ms of the first encoding of that shape, and of
    the second."""
    rows = []
    parameter = model.lm_head.weight
    sides, batches = encoder_shapes(settings)  # what a worker warms up
    for side in sides:
        for batch in batches:
            views = torch.rand(batch, 3, side, side, device=parameter.device).to(parameter.dtype)
            times = []
            for _ in range(2):
                torch.cuda.synchronize()
                started = time.perf_counter()
                model.model.view_features(views)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - started) * 1000)
            rows.append({"side": side, "batch": batch, "first_ms": times[0], "second_ms": times[1]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gundam", type=int, default=16, help="Gundam pages in the batch")
    parser.add_argument("--base", type=int, default=16, help="Base pages in the batch")
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    model = build_random_model(DeepseekOcrConfig(), torch.device("cuda")).eval()
    pages = page_variants(Mode.GUNDAM, args.gundam, 0) + page_variants(Mode.BASE, args.base, 1)
    settings = GenerationSettings()
    with torch.inference_mode():
        first_use = first_use_timings(model, settings)
        for _ in range(2):  # warm-up: allocator, kernels' first launches
            encode_pages(model, pages, settings)
        torch.cuda.synchronize()
        timings = {
            "current_stream": timed_encoding(model, pages, settings, torch.cuda.current_stream()),
            "side_stream": timed_encoding(model, pages, settings, torch.cuda.Stream()),
        }
        torch.cuda.set_sync_debug_mode("error")
        try:
            encode_pages(model, pages, settings)
            synchronising_call = None
        except RuntimeError as error:
            synchronising_call = str(error)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        host_ops, gpu_ops, kernel_launches = profiled_host_ops(model, pages, settings)
    for row in first_use:
        print(
            f"side {row['side']} x{row['batch']}: first {row['first_ms']:.0f} ms, "
            f"second {row['second_ms']:.0f} ms"
        )
    for label, figures in timings.items():
        print(f"{label}: host {figures['host_launch_ms']:.1f} ms, GPU {figures['gpu_ms']:.1f} ms")
    print(f"synchronising call: {synchronising_call or 'none found'}")
    print(f"kernel launches: {kernel_launches}")
    for op in host_ops[:12]:
        print(f"  {op['name']}: {op['self_host_ms']:.1f} ms self host time, {op['calls']} calls")
    for op in gpu_ops[:12]:
        print(f"  {op['name']}: {op['gpu_ms']:.1f} ms GPU, {op['calls']} calls")
    if args.out:
        result = {
            **gpu_run_info(torch.device("cuda"), "bench.encode_host_time"),
            "pages": {"gundam": args.gundam, "base": args.base},
            "timings": timings,
            "synchronising_call": synchronising_call,
            "first_use": first_use,
            "kernel_launches": kernel_launches,
            "host_ops": host_ops,
            "gpu_ops": gpu_ops,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
