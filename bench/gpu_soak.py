"""Soak of the GPU decode path: thousands of pages through repeated calls and a resident stream.

    timeout 560 python3 -m bench.gpu_soak --out "$OUT/gpu_soak.json"      # H200, ~6.5 min
    python3 -m bench.gpu_soak --tiny --device cpu --modes small --calls 20 --pages 200 \
        --max-batch 16 --max-tokens 64 --time-budget 120 --out /tmp/soak.json

Full-size architecture with random bf16 weights (bench/model_gpu.py), CUDA graphs on (the
default). Setup, then two phases, each as a user of the Python API or a resident worker drives it:

setup: an EOS probe (4 pages, 32 tokens); one deliberately oversized call (512 Gundam pages, every
    view encoded in one batch) that must run out of memory, shrink and finish; then the model's
    resident generator is sized at once for the longest page (`serving.slot_capacity` of
    `--max-tokens`; as many of `--max-batch` slots as free memory holds) and warmed up with one
    call of `--max-batch` short pages, so no warm-up page has to decode 3,000 tokens.
(a) repeated `generate` calls: per call `--max-batch ** u^10` pages (u uniform: median 1, mean
    ~11, 95th percentile ~41, about 1 call in 85 of 256-512), each page in a random mode
    (tiny/small/base/large/gundam) with its own output limit (1-7 tokens; one call in
    `--long-every` uses the long limits below), through the resident generator;
(b) the resident streaming generator (`Generator.run`, what `ocrflow gpu-worker` drives) on the
    same resident generator: pages fed in random bursts of 1-64 while it decodes, output limits
    `--max-tokens ** u^3` (1-3,000: median 2, mean ~139, 5% over 1,000), until the pages of
    both phases reach `--pages`.

EOS fires at data-dependent points: the EOS id is set to the token the model emits most often in
the probe, so sequences end both by EOS and by their limit (the JSON records the mean output
tokens per page of each phase).

`--time-budget` covers the whole run from the model's build: phase (a) stops at `--calls` or at
`--calls-share` of the time setup leaves, phase (b) at `--pages` or `DRAIN_RESERVE_S` before the
budget's end (pages in flight then finish). Measured on an H200 (2026-12-03,
bench/results/gpu_soak.json): build 3 s, setup 41 s, phase (a) 1,000 calls in 198 s (10,997
pages), phase (b) 7,979 pages in 141 s: 384 s, ended by the targets; at most the default budget
of 510 s plus the drain, so `timeout 560` holds it.

A crash is a call that raised, or a page reported with an error. Memory is read after warm-up
(sizing, the warm-up call and 10 calls) and after each phase. The result is written after setup
and after each phase (`complete` false, `targets_met` false until the end), so a run cut short
still leaves its numbers. Writes bench/results/gpu_soak.json.
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
from models.deepseek_ocr.resident import ResidentGenerator, resident_generator
from models.deepseek_ocr.serving import slot_capacity

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_PATH = REPO_ROOT / "bench" / "results" / "gpu_soak.json"
MODES = (Mode.TINY, Mode.SMALL, Mode.BASE, Mode.LARGE, Mode.GUNDAM)
WARM_UP_CALLS = 10  # phase (a) calls before memory is read as the steady state
# Seconds kept at the budget's end for the stream's pages in flight: a 3,000-token page fed just
# before the deadline decodes in ~15 s at the small batches a draining stream runs.
DRAIN_RESERVE_S = 20.0


def host_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def gpu_mem_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_reserved(device) / 2**30


def memory(device: torch.device) -> dict:
    """Reserved GPU memory (the allocator's cache included), allocated (live tensors), host RSS:
    reserved growing while allocated stays flat is cache, not a leak."""
    allocated = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "gpu_mem_gib": gpu_mem_gib(device),
        "gpu_allocated_gib": allocated,
        "host_rss_mib": host_rss_mib(),
    }


def generator_state(resident: ResidentGenerator) -> dict:
    """Size and graphs of the resident generator now (zeros when none is resident)."""
    generator = resident.generator
    return {
        "slots": generator.num_slots if generator else 0,
        "capacity": generator.cache.capacity if generator else 0,
        "graph_count": generator.graph_count if generator else 0,
        "graph_pool_gib": (generator.graph_pool_bytes if generator else 0) / 2**30,
        "memory_ceiling": resident.memory_ceiling,
        "replacements": resident.replacements,
    }


def seconds_summary(seconds: list[float]) -> dict:
    """Mean, median, 95th percentile and maximum, in seconds."""
    if not seconds:
        return {"mean": None, "p50": None, "p95": None, "max": None}
    ordered = sorted(seconds)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "mean": round(sum(ordered) / len(ordered), 4),
        "p50": round(at(0.5), 4),
        "p95": round(at(0.95), 4),
        "max": round(ordered[-1], 4),
    }


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
        self.resident = resident_generator(model)
        self.rng = random.Random(args.seed)
        self.modes = tuple(Mode(name) for name in args.modes.split(","))
        needed = {*self.modes, *([Mode.GUNDAM] if self.device.type == "cuda" else [])}
        self.pages = {
            mode: page_variants(mode, args.variants, seed=i)
            for i, mode in enumerate(MODES)
            if mode in needed
        }
        self.calls = 0
        self.pages_done = 0
        self.output_tokens = 0
        self.call_seconds: list[float] = []  # phase (a)'s calls
        self.memory_trace: list[dict] = []  # every --memory-every calls: plateau or leak
        self.call_pages: list[int] = []
        self.crashes: list[str] = []
        self.finish_reasons: Counter[str] = Counter()
        self.oom_recovered = 0
        self.max_batch, self.max_tokens = args.max_batch, args.max_tokens
        self.settings = GenerationSettings(max_new_tokens=self.max_tokens, max_batch=self.max_batch)

    # -- page streams ---------------------------------------------------------------------

    def random_page(self) -> PageInputs:
        return self.rng.choice(self.pages[self.rng.choice(self.modes)])

    def call_batch(self) -> int:
        """1 to max-batch pages, most calls small: max_batch ** (u^10) (median 1, mean ~11 of
        512), so a thousand calls fit the budget and a few still reach hundreds of pages."""
        return max(1, min(self.max_batch, int(self.max_batch ** (self.rng.random() ** 10))))

    def short_limit(self) -> int:
        return max(1, int(8 ** self.rng.random()))

    def long_limit(self) -> int:
        """1 to max-tokens, skewed short (max_tokens ** u^3): the stream's and long calls' pages."""
        return max(1, min(self.max_tokens, int(self.max_tokens ** (self.rng.random() ** 3))))

    # -- probes and bookkeeping -----------------------------------------------------------

    def choose_eos(self) -> int:
        """The token random weights emit most: as EOS it ends sequences at data-dependent
        points."""
        probe = [self.random_page() for _ in range(4)]
        tokens = min(32, self.max_tokens)
        outputs = generate(
            self.model, probe, replace(self.settings, ignore_eos=True, max_new_tokens=tokens)
        )
        counts = Counter(token for output in outputs for token in output.token_ids[tokens // 4 :])
        eos = counts.most_common(1)[0][0]
        self.settings = replace(self.settings, eos_token_id=eos)
        return eos

    def record(self, outputs: list[PageGeneration]) -> None:
        self.pages_done += len(outputs)
        self.output_tokens += sum(output.output_tokens for output in outputs)
        self.finish_reasons.update(str(output.finish_reason) for output in outputs)

    def crash(self, where: str, error: BaseException) -> None:
        self.crashes.append(f"{where}: {type(error).__name__}: {error}"[:500])
        traceback.print_exception(error, limit=4)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a sticky CUDA error surfaces here, not later

    def count_ooms(self, work) -> int:
        """Run `work()`; add and return the out-of-memory recoveries and cache shrinks it caused
        (on whichever generator it ran: the resident one may be replaced meanwhile)."""
        before = self.resident.generator
        recoveries = before.oom_recoveries if before else 0
        shrinks = self.resident.allocation_shrinks
        work()
        after = self.resident.generator
        added = (after.oom_recoveries - (recoveries if after is before else 0)) if after else 0
        added += self.resident.allocation_shrinks - shrinks
        self.oom_recovered += added
        return added

    # -- setup ----------------------------------------------------------------------------

    def generate_call(self, pages: list[PageInputs], limits: list[int], settings=None) -> None:
        self.calls += 1
        try:
            self.record(
                generate(self.model, pages, settings or self.settings, max_new_tokens=limits)
            )
        except Exception as error:
            self.crash(f"generate call {self.calls} ({len(pages)} pages)", error)

    def oversized_call(self) -> dict:
        """512 Gundam pages with every view in one encoder batch: out of memory, then smaller
        batches until it fits."""
        gundam = self.pages[Mode.GUNDAM]
        pages = [gundam[i % len(gundam)] for i in range(self.max_batch)]
        settings = replace(self.settings, views_per_batch=None, prefill_tokens=1 << 22)
        done = self.pages_done
        ooms = self.count_ooms(lambda: self.generate_call(pages, [4] * len(pages), settings))
        return {"pages": len(pages), "finished": self.pages_done - done, "oom_recoveries": ooms}

    def warm_up(self) -> dict:
        """Size the resident generator for the longest page at once (as many of max-batch slots
        as memory holds), then one call of max-batch short pages: the largest encoder, prefill
        and decode batches a call makes."""
        capacity = slot_capacity(self.model.config.decoder, self.max_tokens)
        with self.resident.lock:
            self.count_ooms(
                lambda: self.resident.acquire(
                    self.settings, num_slots=self.max_batch, capacity=capacity
                )
            )
        pages = [self.random_page() for _ in range(self.max_batch)]
        limits = [max(2, self.short_limit()) for _ in pages]  # every page reaches a decode step
        self.count_ooms(lambda: self.generate_call(pages, limits))
        return generator_state(self.resident)

    # -- phases ---------------------------------------------------------------------------

    def repeated_calls(self, deadline: float, stop_at: int) -> None:
        while self.calls < stop_at and time.monotonic() < deadline:
            long_call = self.calls % self.args.long_every == 0
            size = self.call_batch()
            pages = [self.random_page() for _ in range(size)]
            limits = [self.long_limit() if long_call else self.short_limit() for _ in pages]
            started = time.perf_counter()
            self.count_ooms(lambda: self.generate_call(pages, limits))  # noqa: B023
            self.call_seconds.append(time.perf_counter() - started)
            self.call_pages.append(size)
            if self.calls % self.args.memory_every == 0:
                self.memory_trace.append({"calls": self.calls, **memory(self.device)})

    def stream(self, deadline: float) -> dict:
        """The resident streaming generator fed in bursts until the page target or deadline."""
        capacity = slot_capacity(self.model.config.decoder, self.max_tokens)
        finished: list[PageGeneration] = []
        errors: list[str] = []
        remaining = max(0, self.args.pages - self.pages_done)
        replacements = self.resident.replacements
        started = time.monotonic()

        def on_finished(page: FedPage, outcome: PageGeneration | Exception) -> None:
            if isinstance(outcome, Exception):
                errors.append(f"stream page {page.key}: {type(outcome).__name__}: {outcome}"[:500])
            else:
                finished.append(outcome)

        def run() -> None:
            generator = self.resident.acquire(
                self.settings, num_slots=self.args.stream_slots, capacity=capacity
            )
            try:
                generator.run(BurstFeed(self, remaining, deadline), on_finished)
            except Exception as error:
                self.crash("stream", error)

        with self.resident.lock:
            self.count_ooms(run)
            state = generator_state(self.resident)
        seconds = time.monotonic() - started
        self.crashes += errors
        self.record(finished)
        tokens = sum(output.output_tokens for output in finished)
        return {
            "pages": len(finished),
            "errors": len(errors),
            "graph_count": state["graph_count"],
            "graph_pool_gib": state["graph_pool_gib"],
            "slots": state["slots"],
            "capacity": state["capacity"],
            "seconds": round(seconds, 1),
            "pages_per_s": round(len(finished) / seconds, 2) if seconds else None,
            "mean_output_tokens": round(tokens / len(finished), 1) if finished else None,
            "replaced_generator": self.resident.replacements > replacements,
        }

    def calls_summary(self, seconds: float, pages: int, tokens: int, warm: dict) -> dict:
        """Phase (a)'s diagnostics: call times, sizes, rates and the generator it ran on."""
        calls = len(self.call_seconds)
        return {
            **{k: v for k, v in generator_state(self.resident).items() if k != "replacements"},
            "generator_replacements": self.resident.replacements,
            "allocation_shrinks": self.resident.allocation_shrinks,
            "calls": calls,
            "pages": pages,
            "seconds": round(seconds, 1),
            "call_s": seconds_summary(self.call_seconds),
            "mean_pages_per_call": round(sum(self.call_pages) / calls, 2) if calls else None,
            "pages_per_s": round(pages / seconds, 2) if seconds else None,
            "mean_output_tokens": round(tokens / pages, 2) if pages else None,
            "generator_after_warm_up": warm,
            "replacements_during_calls": self.resident.replacements - warm["replacements"],
        }


class Report:
    """The result JSON, rewritten after every phase so a run cut short leaves its numbers."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.started = time.monotonic()
        self.result: dict = {
            **gpu_run_info(device, "bench.gpu_soak"),
            "config": "tiny"
            if args.tiny
            else "official sizes, random bf16 weights, CUDA graphs on",
            "complete": False,
            "phase_reached": "start",
            "targets": {"crashes": 0, "calls": args.calls, "pages": args.pages},
            "targets_met": False,
            "time_budget_s": args.time_budget,
        }

    def write(self, phase: str, soak: Soak | None, **fields) -> None:
        self.result.update(fields, phase_reached=phase)
        if soak is not None:
            self.result.update(
                calls=soak.calls,
                pages=soak.pages_done,
                crashes=len(soak.crashes),
                crash_messages=soak.crashes[:10],
                oom_recovered=soak.oom_recovered,
                finish_reasons=dict(soak.finish_reasons),
            )
        self.result["duration_s"] = round(time.monotonic() - self.started, 1)
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.result, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="generate calls in phase (a)")
    parser.add_argument("--pages", type=int, default=20000, help="pages in all (phase b tops up)")
    parser.add_argument(
        "--time-budget", type=float, default=510.0, help="seconds for the whole run, build included"
    )
    parser.add_argument(
        "--calls-share", type=float, default=0.6, help="most of the phases' time (a) may take"
    )
    parser.add_argument("--long-every", type=int, default=400, help="one long call in this many")
    parser.add_argument("--stream-slots", type=int, default=256, help="fewest slots of (b)")
    parser.add_argument("--max-batch", type=int, default=512, help="largest call")
    parser.add_argument("--max-tokens", type=int, default=3000, help="longest output")
    parser.add_argument("--variants", type=int, default=8, help="distinct pages per mode")
    parser.add_argument("--modes", default=",".join(MODES), help="modes pages are drawn from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--memory-every", type=int, default=100, help="phase (a) calls between memory readings"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny config (smoke test on CPU)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=RESULT_PATH)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    report = Report(args, device)
    end = report.started + args.time_budget
    config = DeepseekOcrConfig.tiny() if args.tiny else DeepseekOcrConfig()
    model = build_random_model(config, device)
    soak = Soak(model, args)
    resident = soak.resident
    setup_s = {"model_build": round(time.monotonic() - report.started, 1)}

    def timed(name: str, work):
        started = time.monotonic()
        value = work()
        setup_s[name] = round(time.monotonic() - started, 1)
        return value

    with torch.inference_mode():
        eos = timed("eos_probe", soak.choose_eos)
        oversized = None
        if device.type == "cuda":  # on CPU, running out of memory is the OOM killer's, not ours
            oversized = timed("oversized_call", soak.oversized_call)
        timed("warm_up", soak.warm_up)
        report.write("setup", soak, eos_token_id=eos, setup_s=setup_s, oversized_call=oversized)

        # Phase (a) may take `calls_share` of what is left, phase (b) the rest.
        calls_started = time.monotonic()
        pages_before, tokens_before = soak.pages_done, soak.output_tokens
        left = max(0.0, end - DRAIN_RESERVE_S - calls_started)
        calls_deadline = calls_started + left * args.calls_share
        soak.repeated_calls(calls_deadline, stop_at=min(args.calls, soak.calls + WARM_UP_CALLS))
        warm = memory(device)
        warm_state = generator_state(resident)
        warm_calls = soak.calls
        soak.repeated_calls(calls_deadline, stop_at=args.calls)
        after_calls = memory(device)
        calls_summary = soak.calls_summary(
            time.monotonic() - calls_started,
            soak.pages_done - pages_before,
            soak.output_tokens - tokens_before,
            warm_state,
        )
        memory_fields = {
            "gpu_mem_growth_gib": after_calls["gpu_mem_gib"] - warm["gpu_mem_gib"]
            if device.type == "cuda"
            else None,
            "host_rss_growth_mib": after_calls["host_rss_mib"] - warm["host_rss_mib"],
            "memory": {
                "after_warm_up": warm,
                "after_calls": after_calls,
                "warm_up_calls": warm_calls,
                "trace": soak.memory_trace,
                "growth_measured": "reserved GPU memory and host RSS, after warm-up to after "
                "phase (a); phase (b) decodes on the same resident generator, see "
                "gpu_mem_growth_to_stream_end_gib",
            },
        }
        report.write("calls", soak, generate_calls=calls_summary, **memory_fields)

        stream = soak.stream(end - DRAIN_RESERVE_S)
        after_stream = memory(device)
        resident.release()
        memory_fields["memory"].update(after_stream=after_stream, end=memory(device))
        memory_fields["gpu_mem_growth_to_stream_end_gib"] = (
            after_stream["gpu_mem_gib"] - warm["gpu_mem_gib"] if device.type == "cuda" else None
        )
    met = not soak.crashes and soak.calls >= args.calls and soak.pages_done >= args.pages
    report.write("done", soak, stream=stream, **memory_fields, complete=True, targets_met=met)
    print(json.dumps({k: v for k, v in report.result.items() if k != "crash_messages"}, indent=1))
    print(f"wrote {args.out}")
    return 0 if not soak.crashes else 1


if __name__ == "__main__":
    sys.exit(main())
