"""How a running batch refills its freed slots: one group at a time against every free slot at once.

    python3 -m bench.stream_admission                    # on the H200, ~2 min
    python3 -m bench.stream_admission --tiny --device cpu --pages 24 --slots 8   # smoke test

With outputs of different lengths, pages end one or two per decode step. Refilling each freed
slot at once (`admit_pages=1`, what the resident generator did) encodes and prefills one page
between every pair of steps; `Generator.admit_size` waits for an eighth of the batch (at most
`admit_pages`) and admits those pages together. Both arms decode the same pages of the routed
mix (`bench.gpu_throughput`'s synthetic pages) with the same drawn output lengths (log-normal,
mean 700 tokens, capped at `--max-tokens`, EOS ignored) through the streaming
`Generator`, alternating arms over `--rounds`; the first arm is the baseline. An arm such as
`32+thread` encodes its admitted groups on the encoder thread (`encoder_thread`,
`OCRFLOW_OVERLAP_ENCODING`) while the batch decodes: `--arms 32,32+thread` is that A/B. Prints
pages/s per arm and the ratio; writes bench/results/stream_admission.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from bench.e2e_engine import LOGNORMAL_SIGMA, lognormal_mu
from bench.gpu_throughput import gpu_run_info, mixed_batch, mode_mix, page_variants, sync
from bench.model_gpu import add_random_model_arguments, random_model_from_args
from models.deepseek_ocr.generation_types import FedPage, GenerationSettings, warm_up_encoder
from models.deepseek_ocr.generator import Generator

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_PATH = REPO_ROOT / "bench" / "results" / "stream_admission.json"


def drawn_lengths(count: int, max_tokens: int, seed: int) -> list[int]:
    """`bench.e2e_gpu`'s `--lengths lognormal` distribution (mean 700, a median near 500 and a
    tail past 2,000), drawn from a seeded generator."""
    rng = random.Random(seed)
    mu = lognormal_mu()
    draws = (rng.lognormvariate(mu, LOGNORMAL_SIGMA) for _ in range(count))
    return [max(1, min(max_tokens, round(value))) for value in draws]


def timed_run(model, fed: list[FedPage], settings: GenerationSettings, slots: int, capacity: int):
    generator = Generator(model, settings, num_slots=slots, capacity=capacity)
    device = model.lm_head.weight.device
    sync(device)
    started = time.perf_counter()
    outputs = generator.run_all(fed)
    sync(device)
    seconds = time.perf_counter() - started
    generator.release()
    return seconds, sum(len(output.token_ids) for output in outputs.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=512)
    parser.add_argument("--slots", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=3000)
    parser.add_argument(
        "--arms",
        default="1,32",
        help="admit_pages per arm, baseline first; '32+thread': encoded on the encoder thread",
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    add_random_model_arguments(parser, RESULT_PATH)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model = random_model_from_args(args)
    mix = mode_mix()
    variants = {mode: page_variants(mode, 8, seed=i) for i, mode in enumerate(mix)}
    pages = mixed_batch(variants, mix, args.pages)
    lengths = drawn_lengths(args.pages, args.max_tokens, args.seed)
    fed = [FedPage(i, page, n) for i, (page, n) in enumerate(zip(pages, lengths, strict=True))]
    capacity = max(len(page.input_ids) for page in pages) + args.max_tokens
    arms = args.arms.split(",")
    if len(set(arms)) < len(arms):
        parser.error("each arm once (--rounds repeats them)")
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    tokens = 0
    with torch.inference_mode():
        # Every encoder shape's cuDNN plans first, as a worker builds them before its first page:
        # otherwise the first arm alone pays ~9 s for them (27% slower in one H200 run).
        if device.type == "cuda":
            warm_up_encoder(model, GenerationSettings())
        warm = GenerationSettings(max_new_tokens=4, ignore_eos=True, max_batch=args.slots)
        timed_run(model, fed[:4], warm, args.slots, capacity)  # kernels, allocator
        for round_ in range(args.rounds):
            for arm in arms:
                settings = GenerationSettings(
                    max_new_tokens=args.max_tokens,
                    ignore_eos=True,
                    max_batch=args.slots,
                    admit_pages=int(arm.removesuffix("+thread")),
                    encode_thread=arm.endswith("+thread"),
                )
                elapsed, tokens = timed_run(model, fed, settings, args.slots, capacity)
                seconds[arm].append(elapsed)
                print(
                    f"round {round_ + 1} admit_pages={arm}: {args.pages / elapsed:.2f} pages/s "
                    f"({elapsed:.1f} s)",
                    flush=True,
                )
    rates = {arm: args.pages / statistics.median(times) for arm, times in seconds.items()}
    baseline = arms[0]
    result = {
        **gpu_run_info(device, "bench.stream_admission"),
        "config": "tiny" if args.tiny else "official sizes, random bf16 weights",
        "pages": args.pages,
        "slots": args.slots,
        "output_tokens_per_page_mean": tokens / args.pages,
        "baseline": f"admit_pages={baseline}",
        "pages_per_s": rates,
        "ratio_vs_baseline": {arm: rate / rates[baseline] for arm, rate in rates.items()},
        "seconds": seconds,
    }
    print(json.dumps(result["ratio_vs_baseline"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
