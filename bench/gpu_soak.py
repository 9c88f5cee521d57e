"""Soak of the GPU decode path: thousands of pages through repeated calls and a resident stream.

    python3 -m bench.gpu_soak                                   # H200, ~4 min
    python3 -m bench.gpu_soak --tiny --device cpu --calls 20 --pages 200 --max-batch 16 \
        --max-tokens 64 --time-budget 120

Full-size architecture with random bf16 weights (bench/model_gpu.py), CUDA graphs on (the
default). Two phases, each as a user of the Python API or a resident worker would drive it:

(a) repeated `generate` calls: per call a random number of pages (1-512, most calls small),
    each page in a random mode (tiny/small/base/large/gundam) with its own output limit (most
    calls 1-8 tokens, one call in `--long-every` up to 3,000), through the model's resident
    generator, which grows, releases and re-captures its graphs as calls need;
(b) the resident streaming generator (`Generator.run`, what `ocrflow gpu-worker` drives): pages
    fed in random bursts while it decodes, output limits 1-3,000 (skewed short).

EOS fires at data-dependent points: the EOS id is set to the token the model emits most often in
a probe run, so sequences end both by EOS and by their limit. One deliberately oversized call
(512 Gundam pages, every view encoded in one batch) must run out of memory, shrink and finish.

A crash is a call that raised, or a page reported with an error. Memory is read after warm-up
(the first calls, which grow the generator to its largest size) and at the end. Writes
bench/results/gpu_soak.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from bench.gpu_throughput import gpu_run_info, page_variants
from bench.model_gpu import build_random_model
from infra.vocabulary import Mode
from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.generation import generate
from models.deepseek_ocr.generation_types import FedPage, GenerationSettings, PageGeneration
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM
from models.deepseek_ocr.processor import PageInputs
from models.deepseek_ocr.resident import resident_generator
from models.deepseek_ocr.serving import slot_capacity

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_PATH = REPO_ROOT / "bench" / "results" / "gpu_soak.json"
MODES = (Mode.TINY, Mode.SMALL, Mode.BASE, Mode.LARGE, Mode.GUNDAM)


def host_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def gpu_mem_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_reserved(device) / 2**30


class BurstFeed:
    """Pages in random bursts of 1-64, as claims arrive; closes after `total` or the deadline."""

    def __init__(self, soak: Soak, total: int, deadline: float) -> None:
        self.soak, self.total, self.deadline, self.sent = soak, total, deadline, 0

    def take(self, limit: int, *, wait: bool) -> list[FedPage] | None:
        if self.sent >= self.total or time.monotonic() > self.deadline:
            return None
        burst = min(limit, self.soak.rng.randint(1, 64), self.total - self.sent)
        pages = [
            FedPage(self.sent + i, self.soak.random_page(), self.soak.long_limit())
            for i in range(burst)
        ]
        self.sent += burst
        return pages


class Soak:
    def __init__(self, model: DeepseekOcrForCausalLM, args: argparse.Namespace) -> None:
        self.model, self.args = model, args
        self.device = model.lm_head.weight.device
        self.rng = random.Random(args.seed)
        self.pages = {
            mode: page_variants(mode, args.variants, seed=i) for i, mode in enumerate(MODES)
        }
        self.calls = 0
        self.pages_done = 0
        self.crashes: list[str] = []
        self.finish_reasons: Counter[str] = Counter()
        self.oom_recovered = 0
        self.max_batch, self.max_tokens = args.max_batch, args.max_tokens
        self.settings = GenerationSettings(max_new_tokens=self.max_tokens, max_batch=self.max_batch)

    # -- page streams ---------------------------------------------------------------------

    def random_page(self) -> PageInputs:
        return self.rng.choice(self.pages[self.rng.choice(MODES)])

    def call_batch(self) -> int:
        """1 to max-batch pages, most calls small: max_batch ** (u^6) (mean ~15 of 512)."""
        return max(1, min(self.max_batch, int(self.max_batch ** (self.rng.random() ** 6))))

    def short_limit(self) -> int:
        return max(1, int(8 ** self.rng.random()))

    def long_limit(self) -> int:
        """1 to max-tokens, skewed short (max_tokens ** u^3): the stream's and long calls' pages."""
        return max(1, min(self.max_tokens, int(self.max_tokens ** (self.rng.random() ** 3))))

    # -- probes and bookkeeping -----------------------------------------------------------

    def choose_eos(self) -> int:
        """The token random weights emit most: as EOS it ends sequences at data-dependent
        points."""
        probe = [self.random_page() for _ in range(8)]
        outputs = generate(
            self.model, probe, replace(self.settings, ignore_eos=True, max_new_tokens=64)
        )
        counts = Counter(token for output in outputs for token in output.token_ids[8:])
        eos = counts.most_common(1)[0][0]
        self.settings = replace(self.settings, eos_token_id=eos)
        return eos

    def record(self, outputs: list[PageGeneration]) -> None:
        self.pages_done += len(outputs)
        self.finish_reasons.update(str(output.finish_reason) for output in outputs)

    def crash(self, where: str, error: BaseException) -> None:
        self.crashes.append(f"{where}: {type(error).__name__}: {error}"[:500])
        traceback.print_exception(error, limit=4)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a sticky CUDA error surfaces here, not later

    # -- phases ---------------------------------------------------------------------------

    def generate_call(self, pages: list[PageInputs], limits: list[int], settings=None) -> None:
        self.calls += 1
        try:
            self.record(
                generate(self.model, pages, settings or self.settings, max_new_tokens=limits)
            )
        except Exception as error:
            self.crash(f"generate call {self.calls} ({len(pages)} pages)", error)

    def warm_up(self) -> None:
        """The largest call shapes first, so the generator reaches its steady size."""
        pages = [self.random_page() for _ in range(self.max_batch)]
        pages[0] = self.pages[Mode.GUNDAM][0]
        limits = [self.short_limit() for _ in pages]
        limits[0] = self.max_tokens
        self.generate_call(pages, limits)

    def oversized_call(self) -> None:
        """512 Gundam pages with every view in one encoder batch: out of memory, then smaller
        batches until it fits."""
        pages = [
            self.pages[Mode.GUNDAM][i % len(self.pages[Mode.GUNDAM])] for i in range(self.max_batch)
        ]
        settings = replace(self.settings, views_per_batch=None, prefill_tokens=1 << 22)
        before = self._generator_oom_count()
        self.generate_call(pages, [4] * len(pages), settings)
        self.oom_recovered += self._generator_oom_count() - before

    def _generator_oom_count(self) -> int:
        resident = resident_generator(self.model)
        generator = resident.generator
        return (generator.oom_recoveries if generator else 0) + resident.allocation_shrinks

    def repeated_calls(self, deadline: float, stop_at: int) -> None:
        while self.calls < stop_at and time.monotonic() < deadline:
            long_call = self.calls % self.args.long_every == 0
            size = self.call_batch()
            pages = [self.random_page() for _ in range(size)]
            limits = [self.long_limit() if long_call else self.short_limit() for _ in pages]
            before = self._generator_oom_count()
            self.generate_call(pages, limits)
            self.oom_recovered += max(0, self._generator_oom_count() - before)

    def stream(self, deadline: float) -> dict:
        """The resident streaming generator fed in bursts until the page target or deadline."""
        resident = resident_generator(self.model)
        slots = self.args.stream_slots
        capacity = slot_capacity(self.model.config.decoder, self.max_tokens)
        finished: list[PageGeneration] = []
        errors: list[str] = []
        remaining = max(0, self.args.pages - self.pages_done)

        def on_finished(page: FedPage, outcome: PageGeneration | Exception) -> None:
            if isinstance(outcome, Exception):
                errors.append(f"stream page {page.key}: {type(outcome).__name__}: {outcome}"[:500])
            else:
                finished.append(outcome)

        with resident.lock:
            generator = resident.acquire(self.settings, num_slots=slots, capacity=capacity)
            try:
                generator.run(BurstFeed(self, remaining, deadline), on_finished)
            except Exception as error:
                self.crash("stream", error)
            self.oom_recovered += generator.oom_recoveries
            graphs = {
                "graph_count": generator.graph_count,
                "graph_pool_gib": generator.graph_pool_bytes / 2**30,
                "slots": generator.num_slots,
                "capacity": generator.cache.capacity,
            }
        self.crashes += errors
        self.record(finished)
        return {"pages": len(finished), "errors": len(errors), **graphs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="generate calls in phase (a)")
    parser.add_argument("--pages", type=int, default=20000, help="pages in all (phase b tops up)")
    parser.add_argument("--time-budget", type=float, default=300.0, help="seconds for both phases")
    parser.add_argument("--calls-share", type=float, default=0.5, help="budget share of (a)")
    parser.add_argument("--long-every", type=int, default=400, help="one long call in this many")
    parser.add_argument("--stream-slots", type=int, default=256)
    parser.add_argument("--max-batch", type=int, default=512, help="largest call")
    parser.add_argument("--max-tokens", type=int, default=3000, help="longest output")
    parser.add_argument("--variants", type=int, default=8, help="distinct pages per mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny config (smoke test on CPU)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=RESULT_PATH)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    config = DeepseekOcrConfig.tiny() if args.tiny else DeepseekOcrConfig()
    model = build_random_model(config, device)
    soak = Soak(model, args)
    started = time.monotonic()
    with torch.inference_mode():
        eos = soak.choose_eos()
        if device.type == "cuda":  # on CPU, running out of memory is the OOM killer's, not ours
            soak.oversized_call()
        soak.warm_up()
        # The budget is for the phases; warm-up and the oversized call come on top.
        calls_deadline = time.monotonic() + args.time_budget * args.calls_share
        soak.repeated_calls(calls_deadline, stop_at=soak.calls + 10)
        warm = {"gpu_mem_gib": gpu_mem_gib(device), "host_rss_mib": host_rss_mib()}
        warm_calls = soak.calls
        soak.repeated_calls(calls_deadline, stop_at=args.calls)
        resident = resident_generator(model)
        calls_graphs = {
            "graph_count": resident.generator.graph_count if resident.generator else 0,
            "graph_pool_gib": (resident.generator.graph_pool_bytes if resident.generator else 0)
            / 2**30,
            "generator_replacements": resident.replacements,
            "allocation_shrinks": resident.allocation_shrinks,
        }
        after_calls = {"gpu_mem_gib": gpu_mem_gib(device), "host_rss_mib": host_rss_mib()}
        stream = soak.stream(calls_deadline + args.time_budget * (1 - args.calls_share))
        resident.release()
        end = {"gpu_mem_gib": gpu_mem_gib(device), "host_rss_mib": host_rss_mib()}
    duration = time.monotonic() - started
    growth = after_calls["gpu_mem_gib"] - warm["gpu_mem_gib"] if device.type == "cuda" else None
    result = {
        **gpu_run_info(device, "bench.gpu_soak"),
        "config": "tiny" if args.tiny else "official sizes, random bf16 weights, CUDA graphs on",
        "calls": soak.calls,
        "pages": soak.pages_done,
        "crashes": len(soak.crashes),
        "crash_messages": soak.crashes[:10],
        "oom_recovered": soak.oom_recovered,
        "gpu_mem_growth_gib": growth,
        "host_rss_growth_mib": after_calls["host_rss_mib"] - warm["host_rss_mib"],
        "duration_s": round(duration, 1),
        "eos_token_id": eos,
        "finish_reasons": dict(soak.finish_reasons),
        "memory": {
            "after_warm_up": warm,
            "after_calls": after_calls,
            "end": end,
            "warm_up_calls": warm_calls,
            "growth_measured": "reserved GPU memory and host RSS, after warm-up to after "
            "phase (a); phase (b) builds a generator of its own size",
        },
        "generate_calls": calls_graphs,
        "stream": stream,
        "targets": {"crashes": 0, "calls": args.calls, "pages": args.pages},
        "targets_met": not soak.crashes
        and soak.calls >= args.calls
        and soak.pages_done >= args.pages,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "crash_messages"}, indent=1))
    print(f"wrote {args.out}")
    return 0 if not soak.crashes else 1


if __name__ == "__main__":
    sys.exit(main())
