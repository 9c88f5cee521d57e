"""Where a DeepSeek-OCR decode step's time goes on one GPU: eager against CUDA graphs.

    python3 -m bench.decode_profile [--batches 128,512] [--steps 64] [--trace-dir DIR]
    python3 -m bench.decode_profile --ab-only [--ab-batches 512,256] [--ab-keys 800,2000]

Full-size architecture, random bf16 weights, Base-mode pages (bench/gpu_throughput.py's
synthetic variants). Per batch size and decode path: milliseconds per decode step (a run with
`1 + steps` output tokens minus a run with one) against the bandwidth roofline's step time.
Then a torch.profiler table of prefill plus `--profile-steps` decode steps per path at the
largest batch (vision encoded beforehand, outside the profile): the kernels by GPU time and the
host operators by CPU time, which tells launch-bound (GPU idle between small kernels) from
bandwidth-bound steps.

Last, the decode-attention A/B (`OCRFLOW_DECODE_ATTENTION`): per batch and longest key length,
rows of ragged lengths (uniform from a quarter of the longest up to it) in a cache of the step's
bucket, each path captured as a CUDA graph and the two replayed alternately in the same run:
the attention of one step (all layers) and the whole decode step (decoder and `lm_head`), as
milliseconds for the baseline `sdpa` (masked SDPA over the padded key range) and for `triton`
(the split-K kernel over each row's own keys), with their ratio.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from bench.gpu_throughput import H200_BANDWIDTH, page_variants, settings_for, timed_generate
from bench.model_gpu import build_random_model, decode_roofline_tokens_per_s
from infra.vocabulary import Mode
from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.decode_attention import DecodeAttention, decode_attention
from models.deepseek_ocr.decode_step import KEY_LENGTH_BUCKET
from models.deepseek_ocr.generation import generate
from models.deepseek_ocr.generation_types import encode_pages
from models.deepseek_ocr.kv_cache import KVCache

AB_PATHS = (DecodeAttention.SDPA, DecodeAttention.TRITON)  # baseline first


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


def ragged_cache(config: DeepseekOcrConfig, batch: int, longest: int) -> tuple[KVCache, int]:
    """A random bf16 cache of `batch` rows holding from `longest // 4` to `longest` keys (one row
    at `longest`, room for one more), and the key length of the step's bucket."""
    decoder = config.decoder
    key_length = -(-(longest + 1) // KEY_LENGTH_BUCKET) * KEY_LENGTH_BUCKET
    cache = KVCache(
        num_layers=decoder.num_hidden_layers,
        num_slots=batch,
        capacity=key_length,
        num_kv_heads=decoder.num_key_value_heads,
        head_dim=decoder.head_dim,
        dtype=torch.bfloat16,
        device="cuda",
    )
    for tensor in (*cache.keys, *cache.values):
        tensor.normal_()
    generator = torch.Generator().manual_seed(batch + longest)
    lengths = torch.randint(longest // 4, longest + 1, (batch,), generator=generator)
    lengths[0] = longest
    cache.lengths = lengths.tolist()
    cache.positions.copy_(lengths)
    return cache, key_length


def captured(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """`fn` run once eagerly (compiles, allocates) and then captured."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def alternated_ms(graphs: dict, rounds: int, replays: int) -> dict:
    """Median milliseconds per replay of each graph, the graphs taking turns every round."""
    times: dict = {name: [] for name in graphs}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(rounds):
        for name, graph in graphs.items():
            graph.replay()  # warm
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / replays)
    return {name: statistics.median(values) for name, values in times.items()}


def attention_ab(model, config: DeepseekOcrConfig, batch: int, longest: int, rounds: int) -> dict:
    """The A/B of one (batch, longest key length): attention alone and the whole decode step,
    per path, in ms; plus the mean row length."""
    cache, key_length = ragged_cache(config, batch, longest)
    start_positions = cache.positions.clone()
    decoder = config.decoder
    heads, head_dim = decoder.num_attention_heads, decoder.head_dim
    query = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    step = cache.device_step(0, batch, key_length)  # positions advance once: the step's lengths
    views = [
        (k[:batch, :, :key_length], v[:batch, :, :key_length])
        for k, v in zip(cache.keys, cache.values, strict=True)
    ]

    def attention(path: DecodeAttention) -> Callable[[], None]:
        def run() -> None:  # what TextAttention does on a decode step, every layer
            for keys, values in views:
                if path is DecodeAttention.TRITON:
                    decode_attention(query, keys, values, step.row_lengths)
                else:
                    F.scaled_dot_product_attention(
                        query, keys, values, attn_mask=step.attention_mask
                    )

        return run

    tokens = torch.randint(0, decoder.vocab_size, (batch, 1), device="cuda")

    def decode_step(path: DecodeAttention) -> Callable[[], None]:
        def run() -> None:  # the generator's step without the n-gram ban and argmax
            model.set_decode_attention(path)
            cache.positions.copy_(start_positions)
            model(tokens, cache_step=cache.device_step(0, batch, key_length))

        return run

    graphs = {("attention", p): captured(attention(p)) for p in AB_PATHS}
    graphs |= {("step", p): captured(decode_step(p)) for p in AB_PATHS}
    model.set_decode_attention(None)  # back to the variable, as the model was built
    ms = alternated_ms(graphs, rounds, replays=10)
    mean_length = float(step.row_lengths.float().mean())
    return {"ms": ms, "mean_length": mean_length, "key_length": key_length}


def print_attention_ab(model, config: DeepseekOcrConfig, batches, longest_keys, rounds) -> None:
    print(
        "\n== decode attention A/B: baseline sdpa (masked SDPA over the padded keys) vs triton "
        "(split-K kernel over each row's own keys), alternated, CUDA graphs =="
    )
    print(
        f"{'batch':>5} {'keys max':>8} {'mean':>6} {'bucket':>6} {'part':>9} "
        f"{'sdpa ms':>8} {'triton ms':>9} {'triton/sdpa':>11}"
    )
    for batch in batches:
        for longest in longest_keys:
            result = attention_ab(model, config, batch, longest, rounds)
            torch.cuda.empty_cache()  # the case's cache and graphs, before the next one's
            for part in ("attention", "step"):
                sdpa = result["ms"][(part, DecodeAttention.SDPA)]
                triton = result["ms"][(part, DecodeAttention.TRITON)]
                print(
                    f"{batch:5d} {longest:8d} {result['mean_length']:6.0f} "
                    f"{result['key_length']:6d} {part:>9} {sdpa:8.3f} {triton:9.3f} "
                    f"{triton / sdpa:10.2f}x"
                )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="128,512")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--profile-steps", type=int, default=16)
    parser.add_argument("--paths", default="eager,graph", help="decode paths to profile")
    parser.add_argument("--trace-dir", type=Path, help="write chrome traces here")
    parser.add_argument("--ab-batches", default="512,256", help="decode-attention A/B batches")
    parser.add_argument("--ab-keys", default="800,2000", help="A/B longest key lengths")
    parser.add_argument("--ab-rounds", type=int, default=5, help="A/B alternations")
    parser.add_argument("--ab-only", action="store_true", help="only the decode-attention A/B")
    parser.add_argument("--no-ab", action="store_true", help="skip the decode-attention A/B")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = DeepseekOcrConfig()
    model = build_random_model(config, torch.device("cuda"))
    ab = (
        [int(b) for b in args.ab_batches.split(",")],
        [int(k) for k in args.ab_keys.split(",")],
        args.ab_rounds,
    )
    if args.ab_only:
        with torch.inference_mode():
            print_attention_ab(model, config, *ab)
        return
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
        if not args.no_ab:
            torch.cuda.empty_cache()
            print_attention_ab(model, config, *ab)


if __name__ == "__main__":
    main()
