"""Pages/s of the batched DeepSeek-OCR engine path on one GPU, per mode and for the routed mix.

    python3 -m bench.gpu_throughput                      # full run, ~5-6 min on an H200
    python3 -m bench.gpu_throughput --quick              # ~2 min: 200 tokens, batch <= 128
    python3 -m bench.gpu_throughput --no-baseline        # the batched rows alone, ~2.5 min less
    python3 -m bench.gpu_throughput --tiny --device cpu  # smoke test of the script itself
    python3 -m bench.gpu_throughput --model deepseek-ocr-2  # DeepSeek-OCR 2 (gpu_throughput_ocr2)

Full-size architecture with random bf16 weights (bench/model_gpu.py's scaled init), so no
checkpoint is needed. Each configuration decodes a batch of pages through the port's own
`generate` (vision encoding batched per view size, right-padded prefill, continuous-batching
decode with the official 20/50 n-gram ban) with the output forced to `--tokens` tokens per page
(EOS ignored). Pages are copies of a synthetic A4 page in `--variants` slightly different
versions, so sequences route to different experts as different pages would.

Per row: pages/s and output tokens/s over the whole call (vision + prefill + decode) of a warm
engine, the way a resident worker runs: the same call made once before, untimed for the row,
built the generator and captured its CUDA graphs (that first call's rate is `cold_pages_per_s`
beside it). Also prefill ms
per page (a run with one output token), peak GPU memory, the decode rate as a fraction of the
bandwidth roofline (bench/model_gpu.py's bytes-per-step model at 4.8 TB/s), and the speedup
over the baseline: the same model, one page at a time through the same `generate` with an eager
decode loop (the way the official `infer()` runs), measured in the same run at the same output
tokens per page as the row (per single mode; the mix row has none). The port's one-page path
(CUDA graphs) is timed beside it. A check step compares batched with one-at-a-time greedy tokens and
reports, for pages that differ, the top-2 logit margin where they first part (a near-tie is
bf16 noise; a wide margin is a batching bug). An out-of-memory configuration is halved and
retried. Writes bench/results/gpu_throughput.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch

from bench.model_gpu import (
    BOS_ID,
    IMAGE_TOKEN_ID,
    SUFFIX_IDS,
    build_random_model,
    decode_roofline_tokens_per_s,
    synthetic_page,
)
from infra.vocabulary import Mode
from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.generation import generate
from models.deepseek_ocr.generation_types import GenerationSettings
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM
from models.deepseek_ocr.processor import PageInputs, prepare_page_from_ids

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT_PATH = REPO_ROOT / "bench" / "results" / "gpu_throughput.json"
ROUTING_PATH = REPO_ROOT / "bench" / "results" / "routing.json"
H200_BANDWIDTH = 4.8e12
# Used when bench/results/routing.json is absent: scans of the mixed corpus, by routed mode.
DEFAULT_MIX = {Mode.TINY: 0.25, Mode.SMALL: 0.125, Mode.GUNDAM: 0.625}
DEFAULT_BATCH = {Mode.TINY: 512, Mode.SMALL: 512, Mode.BASE: 512, Mode.LARGE: 384}
GUNDAM_BATCH = 256


@dataclass
class Row:
    mode: str
    batch_size: int
    output_tokens_per_page: int
    pages_per_s: float  # a warm call: the resident generator and its graphs built
    cold_pages_per_s: float  # the first call of the same work, building both
    output_tokens_per_s: float
    prefill_ms_per_page: float
    decode_tokens_per_s: float | None
    peak_gpu_mem_gib: float | None
    roofline_fraction: float | None
    speedup_vs_baseline: float | None = None
    out_of_memory_at: list[int] | None = None


def gpu_run_info(device: torch.device, module: str) -> dict:
    """What every GPU result file starts with: when, on what, with which versions, and the
    command that reproduces it."""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
        "command": shlex.join(["python3", "-m", module, *sys.argv[1:]]),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, pages: list[PageInputs], settings: GenerationSettings) -> float:
    """Wall seconds of one `generate` call, device work included."""
    device = model.lm_head.weight.device
    sync(device)
    started = time.perf_counter()
    generate(model, pages, settings)
    sync(device)
    return time.perf_counter() - started


def settings_for(tokens: int, batch: int, cuda_graphs: bool = True) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=tokens, ignore_eos=True, max_batch=batch, cuda_graphs=cuda_graphs
    )


def page_variants(mode: Mode, count: int, seed: int) -> list[PageInputs]:
    """`count` versions of the synthetic page in `mode`, each with slightly different pixels."""
    base = prepare_page_from_ids(
        synthetic_page(), mode, [], SUFFIX_IDS, bos_id=BOS_ID, image_token_id=IMAGE_TOKEN_ID
    )
    generator = torch.Generator().manual_seed(seed)

    def jittered(pixels: torch.Tensor) -> torch.Tensor:  # uint8 views, +-2 levels of noise
        noise = torch.randint(-2, 3, pixels.shape, generator=generator, dtype=torch.int16)
        return (pixels.to(torch.int16) + noise).clamp_(0, 255).to(torch.uint8)

    return [
        replace(base, global_view=jittered(base.global_view), tiles=jittered(base.tiles))
        for _ in range(count)
    ]


def mode_mix(path: Path = ROUTING_PATH) -> dict[Mode, float]:
    """Share of each OCR mode among routed pages (bench/routing.py's result), else the default."""
    if not path.exists():
        return DEFAULT_MIX
    counts: dict[Mode, int] = {}
    for per_kind in json.loads(path.read_text())["modes"].values():
        for route, count in per_kind.items():
            if route in Mode.__members__.values():
                counts[Mode(route)] = counts.get(Mode(route), 0) + count
    total = sum(counts.values())
    return {mode: count / total for mode, count in counts.items()} if total else DEFAULT_MIX


def mixed_batch(variants: dict[Mode, list[PageInputs]], mix: dict[Mode, float], size: int):
    """`size` pages in the mix's proportions (largest remainder), interleaved."""
    exact = {mode: share * size for mode, share in mix.items()}
    counts = {mode: int(value) for mode, value in exact.items()}
    by_remainder = sorted(exact, key=lambda m: exact[m] - counts[m], reverse=True)
    for mode in by_remainder[: size - sum(counts.values())]:
        counts[mode] += 1
    pages = [variants[m][i % len(variants[m])] for m in mix for i in range(counts[m])]
    return pages[::2] + pages[1::2]


def batch_pages(variants, mix: dict[Mode, float], mode: Mode | None, size: int) -> list:
    """`size` pages of one mode (cycling through its variants), or of the mix when mode is None."""
    if mode is None:
        return mixed_batch(variants, mix, size)
    return [variants[mode][i % len(variants[mode])] for i in range(size)]


def measure(
    model,
    label: str,
    pages: list[PageInputs],
    *,
    tokens: int,
    bandwidth: float,
    cuda_graphs: bool = True,
) -> Row:
    device = model.lm_head.weight.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batch = len(pages)
    prefill_s = timed_generate(model, pages, settings_for(1, batch))
    # The first call builds the resident generator (its KV cache) and captures a CUDA graph for
    # each (rows, key length) bucket it reaches; a resident worker pays that once in its life.
    # The row's rate is the second call's, the generator warm; the first is kept beside it.
    cold_s = timed_generate(model, pages, settings_for(tokens, batch, cuda_graphs))
    total_s = timed_generate(model, pages, settings_for(tokens, batch, cuda_graphs))
    # Decode time is the full run minus a prefill-only run; when that difference is lost in
    # timing noise (short outputs), no decode rate or roofline fraction is claimed.
    decode_s = total_s - prefill_s
    decode_rate = batch * (tokens - 1) / decode_s if decode_s > 0.05 * total_s else None
    mean_prompt = sum(len(p.input_ids) for p in pages) / batch
    ceiling = decode_roofline_tokens_per_s(
        model.config, batch, int(mean_prompt + tokens / 2), bandwidth
    )
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Row(
        mode=label,
        batch_size=batch,
        output_tokens_per_page=tokens,
        pages_per_s=batch / total_s,
        cold_pages_per_s=batch / cold_s,
        output_tokens_per_s=batch * tokens / total_s,
        prefill_ms_per_page=prefill_s * 1000 / batch,
        decode_tokens_per_s=decode_rate,
        peak_gpu_mem_gib=peak,
        roofline_fraction=decode_rate / ceiling
        if device.type == "cuda" and decode_rate is not None
        else None,
    )


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_halving_on_oom(make_pages: Callable[[int], list], batch: int, run) -> Row | None:
    """`run(pages)` at `batch` pages, halving the batch after each out-of-memory."""
    failed: list[int] = []
    while batch >= 1:
        try:
            row = run(make_pages(batch))
            row.out_of_memory_at = failed or None
            return row
        except torch.OutOfMemoryError:
            failed.append(batch)
            free_memory()
            batch //= 2
    return None


def one_page_pages_per_s(
    model, page: PageInputs, tokens: int, pages: int, *, cuda_graphs: bool = False
) -> float:
    """One page at a time, each its own `generate` call (batch 1): by default with a plain
    eager decode loop (no CUDA graphs), as the official infer() runs; with `cuda_graphs`, the
    port's own one-page path, which must not be slower than that loop."""
    settings = settings_for(tokens, 1, cuda_graphs=cuda_graphs)
    seconds = sum(timed_generate(model, [page], settings) for _ in range(pages))
    return pages / seconds


def first_divergence(batched: list[int], alone: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(batched, alone, strict=True)) if a != b), None)


def top2_noise(batched: torch.Tensor, alone: torch.Tensor) -> float:
    """Largest change of the alone run's two best scores between the runs, over `(steps, V)`
    scores where both runs picked the same tokens: the bf16 noise batching adds."""
    top2 = alone.float().topk(2, dim=-1).indices
    change = (batched.float().gather(1, top2) - alone.float().gather(1, top2)).abs()
    return float(change.max()) if change.numel() else 0.0


@torch.inference_mode()
def check_agreement(model, pages: list[PageInputs], tokens: int, tie_margin: float) -> dict:
    """Greedy tokens of a mixed batch (the CUDA-graph path) against each page decoded alone
    (eager), and where they part. A parting is a near-tie when the alone run's top-2 margin
    there is below `tie_margin` (absolute; the parity set's README §8 treats bf16 greedy picks
    with a top-2 margin under 0.1 as undecided): a fixed bound, never one set from the gaps
    measured here. The bf16 noise batching adds on the page's agreeing steps (how much it moved
    the top-2 scores there) is reported beside it, for reading, not for the verdict."""
    batched = generate(model, pages, replace(settings_for(tokens, len(pages)), keep_logits=True))
    report = {"pages": len(pages), "tokens": tokens, "identical": 0, "near_tie": 0, "diverged": []}
    for index, (page, together) in enumerate(zip(pages, batched, strict=True)):
        settings = replace(settings_for(tokens, 1, cuda_graphs=False), keep_logits=True)
        alone = generate(model, [page], settings)[0]
        step = first_divergence(together.token_ids, alone.token_ids)
        if step is None:
            report["identical"] += 1
            continue
        top2 = alone.scores[step].float().topk(2).values
        margin = float(top2[0] - top2[1])
        noise = top2_noise(together.scores[:step], alone.scores[:step])
        near_tie = margin < tie_margin
        report["near_tie"] += near_tie
        report["diverged"].append(
            {
                "page": index,
                "mode": str(page.mode),
                "step": step,
                "top2_margin": margin,
                "top2_noise": noise,
                "near_tie": near_tie,
            }
        )
    report["agree_up_to_near_tie"] = report["identical"] + report["near_tie"] == len(pages)
    return report


def print_rows(rows: list[Row]) -> None:
    header = f"{'mode':8} {'batch':>5} {'pages/s':>8} {'cold':>6} {'tok/s':>9} "
    header += f"{'prefill ms/p':>12} {'peak GiB':>8} {'roofline':>8} {'speedup':>8}"
    print(header)
    for r in rows:
        peak = f"{r.peak_gpu_mem_gib:8.1f}" if r.peak_gpu_mem_gib is not None else f"{'-':>8}"
        roof = f"{r.roofline_fraction:8.2f}" if r.roofline_fraction is not None else f"{'-':>8}"
        speed = f"{r.speedup_vs_baseline:7.0f}x" if r.speedup_vs_baseline else f"{'-':>8}"
        print(
            f"{r.mode:8} {r.batch_size:5d} {r.pages_per_s:8.2f} {r.cold_pages_per_s:6.2f} "
            f"{r.output_tokens_per_s:9.0f} "
            f"{r.prefill_ms_per_page:12.1f} {peak} {roof} {speed}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        choices=["deepseek-ocr", "deepseek-ocr-2"],
        default="deepseek-ocr",
        help="deepseek-ocr-2 runs bench/gpu_throughput_ocr2.py (its own rows and result file)",
    )
    parser.add_argument(
        "--tokens", type=int, default=None, help="output tokens per page (1000; OCR-2: 500)"
    )
    parser.add_argument("--modes", default="tiny,small,base,large,gundam,mix")
    parser.add_argument("--max-batch", type=int, default=None, help="cap every batch size")
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="pages per call for every mode (default: per mode; OCR-2: the port's, 256)",
    )
    parser.add_argument(
        "--baseline-pages", type=int, default=1, help="pages per mode of the one-page baseline"
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the one-page runs (no speedup column; saves ~2.5 min on an H200)",
    )
    parser.add_argument("--check-pages", type=int, default=10)
    parser.add_argument("--check-tokens", type=int, default=64)
    parser.add_argument(
        "--tie-margin", type=float, default=0.1, help="absolute top-2 logit margin of a near-tie"
    )
    parser.add_argument("--variants", type=int, default=32, help="distinct pages per mode")
    parser.add_argument("--quick", action="store_true", help="200 tokens, batch <= 128")
    parser.add_argument(
        "--no-cuda-graphs", action="store_true", help="decode eagerly (for comparison)"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny config (smoke test on CPU)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--bandwidth", type=float, default=H200_BANDWIDTH, help="bytes/s")
    parser.add_argument("--out", type=Path, default=None, help="default: by model")
    model, _ = parser.parse_known_args(argv)
    if model.model == "deepseek-ocr-2":  # its options, and its imports, only when asked for
        from bench import gpu_throughput_ocr2

        gpu_throughput_ocr2.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.model == "deepseek-ocr-2":
        args.tokens = args.tokens or 500
        args.batch = args.batch or gpu_throughput_ocr2.PORT_BATCH
        args.out = args.out or gpu_throughput_ocr2.RESULT_PATH
        if args.tiny:
            gpu_throughput_ocr2.tiny_defaults(args)
        return args
    args.tokens = args.tokens or 1000
    args.out = args.out or RESULT_PATH
    if args.quick:
        args.tokens = min(args.tokens, 200)
        args.max_batch = min(args.max_batch or 128, 128)
        args.check_tokens = min(args.check_tokens, 32)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model == "deepseek-ocr-2":
        from bench import gpu_throughput_ocr2

        gpu_throughput_ocr2.run(args)
        return
    device = torch.device(args.device)
    config = DeepseekOcrConfig.tiny() if args.tiny else DeepseekOcrConfig()
    model: DeepseekOcrForCausalLM = build_random_model(config, device)
    labels = [label.strip() for label in args.modes.split(",") if label.strip()]
    mix = mode_mix()
    needed = {Mode(label) for label in labels if label != "mix"} | set(mix) | {Mode.BASE}
    variants = {mode: page_variants(mode, args.variants, seed=i) for i, mode in enumerate(needed)}

    rows: list[Row] = []
    baselines: dict[str, float] = {}
    one_page: dict[str, float] = {}
    with torch.inference_mode():
        generate(model, variants[Mode.BASE][:2], settings_for(4, 2))  # warm-up: kernels, allocator
        for label in labels:
            mode = None if label == "mix" else Mode(label)
            batch = args.batch or (
                GUNDAM_BATCH if mode in (None, Mode.GUNDAM) else DEFAULT_BATCH[mode]
            )
            batch = min(batch, args.max_batch or batch)
            make_pages = partial(batch_pages, variants, mix, mode)
            run = partial(
                measure,
                model,
                label,
                tokens=args.tokens,
                bandwidth=args.bandwidth,
                cuda_graphs=not args.no_cuda_graphs,
            )
            row = measure_halving_on_oom(make_pages, batch, run)
            if row is None:
                print(f"{label}: out of memory even at one page")
                continue
            # A one-page run of the mix would be one mode's, not the mix's: single modes only.
            if mode is not None and not args.no_baseline:
                key = str(mode)
                if key not in baselines:
                    page = make_pages(1)[0]
                    baselines[key] = one_page_pages_per_s(
                        model, page, args.tokens, args.baseline_pages
                    )
                    one_page[key] = one_page_pages_per_s(
                        model, page, args.tokens, args.baseline_pages, cuda_graphs=True
                    )
                row.speedup_vs_baseline = row.pages_per_s / baselines[key]
            rows.append(row)
            print_rows([row])
            free_memory()
        check_pages = mixed_batch(variants, {m: 1 / len(needed) for m in needed}, args.check_pages)
        check = check_agreement(model, check_pages, args.check_tokens, args.tie_margin)

    print()
    print_rows(rows)
    print(f"check: {json.dumps(check)}")
    result = {
        **gpu_run_info(device, "bench.gpu_throughput"),
        "config": "tiny" if args.tiny else "official sizes, random bf16 weights",
        "mode_mix": {str(mode): share for mode, share in mix.items()},
        "baseline": "skipped (--no-baseline)"
        if args.no_baseline
        else "one page per generate call, eager decode loop (no CUDA graphs)",
        "cuda_graphs": not args.no_cuda_graphs,
        "baseline_pages_per_s": baselines,
        "baseline_tokens_per_page": args.tokens,  # the batched rows' count: no extrapolation
        "one_page_cuda_graphs_pages_per_s": one_page,
        "results": [asdict(row) for row in rows],
        "check": check,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
