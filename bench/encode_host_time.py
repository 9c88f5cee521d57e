"""How long the host takes to launch a batch's vision encoding, against the GPU's time for it.

    python3 -m bench.encode_host_time [--gundam 16] [--base 16] [--out FILE]

Full-size architecture, random bf16 weights, the synthetic pages of `bench.gpu_throughput`.
The encoding is timed twice after a warm-up, on the current stream and on a side stream: host
time from the call to its return, GPU time between events around it. Then, under
`torch.cuda.set_sync_debug_mode("error")`, the encoding runs once more, so a call in it that
synchronises the host with the GPU raises. When the host's time is close to the GPU's, the
encoding is bound by launching its kernels, and running it on a side stream beside the decode
steps cannot overlap it: the one thread that would launch the steps is busy launching it.
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
from models.deepseek_ocr.generation_types import GenerationSettings, encode_pages


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
    for label, figures in timings.items():
        print(f"{label}: host {figures['host_launch_ms']:.1f} ms, GPU {figures['gpu_ms']:.1f} ms")
    print(f"synchronising call: {synchronising_call or 'none found'}")
    if args.out:
        result = {
            **gpu_run_info(torch.device("cuda"), "bench.encode_host_time"),
            "pages": {"gundam": args.gundam, "base": args.base},
            "timings": timings,
            "synchronising_call": synchronising_call,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
