"""First GPU measurement of the DeepSeek-OCR port: vision, prefill and decode speed per mode.

    python bench/model_gpu.py [--max-batch 512] [--decode-steps 64] [--budget-s 240]

Builds the full-size architecture (the official sizes, or --config) on the GPU with random
bf16 weights (scaled like the parity formula's categories, so activations and MoE routing look
like a trained network's rather than degenerate), then for every mode: encodes a synthetic page, and
decodes batches of 1, 2, 4, ... copies of it (each copy's vision span slightly perturbed, so
sequences route to different experts as different pages would) through the port's own
`generate` with the official PDF n-gram setting and EOS ignored. Prefill throughput comes from a
run with one output token, decode throughput from the difference to a run with `decode_steps`
more. Doubling stops at the first out-of-memory (recorded) or when the time budget is spent.

Decode is memory-bound, so each row also reports the fraction of a bandwidth roofline:
bytes each step must read (weights touched + KV cache) over HBM bandwidth.
Writes bench/results/model_gpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from models.deepseek_ocr.config import DeepseekOcrConfig  # noqa: E402
from models.deepseek_ocr.formula_weights import fan_in, weight_category  # noqa: E402
from models.deepseek_ocr.generation import generate  # noqa: E402
from models.deepseek_ocr.generation_types import GenerationSettings, encode_pages  # noqa: E402
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM  # noqa: E402
from models.deepseek_ocr.processor import PageInputs, prepare_page_from_ids  # noqa: E402
from models.engine import Mode  # noqa: E402

RESULT_PATH = REPO_ROOT / "bench" / "results" / "model_gpu.json"
# HBM bandwidth in bytes/s by GPU name (vendor datasheets); --bandwidth-tbs overrides.
HBM_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
# The official document prompt around `<image>`: BOS, then "\n<|grounding|>Convert the document
# to markdown." (9 ids). Fixed ids keep the GPU benchmarks free of the tokenizer package.
BOS_ID, IMAGE_TOKEN_ID = 0, 128815
SUFFIX_IDS = [201, 128820, 35734, 254, 3910, 276, 2125, 4465, 16]
VISION_BATCH = 8  # pages per vision-encoder measurement
SPAN_NOISE = 0.05  # relative perturbation of each copy's vision span


@dataclass
class Measurement:
    mode: str
    batch_size: int
    prompt_tokens: int
    status: str  # "ok", "oom"
    encode_ms_per_page: float | None = None
    prefill_tokens_per_s: float | None = None
    prefill_ms_per_page: float | None = None
    decode_tokens_per_s: float | None = None
    decode_ms_per_step: float | None = None
    roofline_tokens_per_s: float | None = None
    roofline_fraction: float | None = None
    peak_gpu_mem_gib: float | None = None


@torch.no_grad()
def build_random_model(config: DeepseekOcrConfig, device: torch.device) -> DeepseekOcrForCausalLM:
    """Full-size model in bf16 on `device`, weights uniform with the formula's scales."""
    with torch.device("meta"):
        model = DeepseekOcrForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for name, tensor in model.state_dict().items():
        fill_scaled_(tensor, name, generator)
    return model.eval()


def add_random_model_arguments(parser: argparse.ArgumentParser, out: Path) -> None:
    """`--tiny`, `--device` and `--out`, as every random-weight GPU benchmark takes them."""
    parser.add_argument("--tiny", action="store_true", help="tiny config (smoke test on CPU)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=out)


def random_model_from_args(args: argparse.Namespace) -> DeepseekOcrForCausalLM:
    """`build_random_model` at the size and on the device `add_random_model_arguments` read."""
    config = DeepseekOcrConfig.tiny() if args.tiny else DeepseekOcrConfig()
    return build_random_model(config, torch.device(args.device))


def fill_scaled_(
    tensor: torch.Tensor, name: str, generator: torch.Generator, fan_in_shape=None
) -> None:
    """Uniform values with the formula's scale for `name`: about 1 for norms, small for biases
    and embeddings-like tensors, unit-variance outputs for the rest (fan-in of `fan_in_shape`,
    the tensor's own shape by default)."""
    u = torch.rand(tensor.shape, generator=generator, device=tensor.device) - 0.5
    category = weight_category(name, tensor.shape)
    if category == "norm":
        tensor.copy_(1.0 + 0.1 * u)
    elif category == "small":
        tensor.copy_(0.02 * u)
    else:
        tensor.copy_(u * math.sqrt(12.0 / fan_in(fan_in_shape or tensor.shape)))


def synthetic_page(width: int = 1240, height: int = 1754) -> Image.Image:
    """An A4-like page at 150 dpi with lines of dark blocks, a table grid and a bar chart."""
    image = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    for row, top in enumerate(range(80, 900, 28)):
        for left in range(80, width - 80 - 40 * (row % 7), 9):
            if (left // 9 * 31 + row * 17) % 7 < 4:
                draw.rectangle((left, top, left + 6, top + 14), fill=(24, 32, 48))
    for x in range(180, 1061, 55):
        draw.line((x, 980, x, 1400), fill=(60, 64, 72), width=2)
    for y in range(980, 1401, 35):
        draw.line((180, y, 1060, y), fill=(60, 64, 72), width=2)
    for k, x in enumerate(range(200, 1000, 60)):
        draw.rectangle((x, 1700 - 40 - (k * 37) % 200, x + 40, 1700), fill=(40, 90, 160))
    return image


def decode_roofline_tokens_per_s(
    config: DeepseekOcrConfig, batch: int, context: int, bandwidth: float
) -> float:
    """Upper bound on decode tokens/s when every step must stream its bytes from HBM once.

    Bytes per step (bf16): attention and dense/shared MLP weights, the router, the routed
    experts that at least one of the batch's tokens selects (expected count
    E * (1 - (1 - K/E)^batch), uniform routing), lm_head, and each sequence's KV cache
    (layers x 2 x kv_heads x head_dim per position). Compute and the embedding lookup are
    ignored, in the spirit of nanoGPT's `estimate_mfu` for a memory-bound step.
    """
    d = config.decoder
    hidden, width = d.hidden_size, d.num_attention_heads * d.head_dim
    kv_width = d.num_key_value_heads * d.head_dim
    params = 0.0
    for layer_type in d.mlp_layer_types:
        params += hidden * (2 * width + 2 * kv_width)
        if layer_type == "dense":
            params += 3 * hidden * d.intermediate_size
        else:
            experts = d.n_routed_experts
            touched = experts * (1 - (1 - d.num_experts_per_tok / experts) ** batch)
            params += experts * hidden + 3 * hidden * d.shared_expert_intermediate_size
            params += touched * 3 * hidden * d.moe_intermediate_size
    params += d.vocab_size * hidden  # lm_head
    kv_bytes = batch * context * d.num_hidden_layers * 2 * kv_width * 2
    return batch / ((params * 2 + kv_bytes) / bandwidth)


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    """`fn(*args, **kwargs)` and its wall time in seconds, GPU work included."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    torch.cuda.synchronize()
    return out, time.perf_counter() - started


def measure_mode(model, page: PageInputs, args, deadline: float, bandwidth: float | None):
    """Vision speed once, then prefill/decode speed at doubling batch sizes."""
    rows: list[Measurement] = []
    spans, encode_s = timed(encode_pages, model, [page] * VISION_BATCH)
    span = spans[0]
    warm_up = GenerationSettings(max_new_tokens=4, ignore_eos=True)
    generate(model, [page, page], warm_up, vision_spans=spans[:2])  # kernels, allocator
    prompt = len(page.input_ids)
    batch = 1
    while batch <= args.max_batch and time.perf_counter() < deadline:
        row = Measurement(page.mode.value, batch, prompt, "ok")
        row.encode_ms_per_page = encode_s * 1000 / VISION_BATCH
        noise = torch.randn(batch, *span.shape, device=span.device, dtype=span.dtype)
        copies = [span + SPAN_NOISE * span.std() * n for n in noise]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            first = GenerationSettings(max_new_tokens=1, ignore_eos=True, max_batch=batch)
            more = GenerationSettings(
                max_new_tokens=1 + args.decode_steps, ignore_eos=True, max_batch=batch
            )
            pages = [page] * batch
            _, prefill_s = timed(generate, model, pages, first, vision_spans=copies)
            _, full_s = timed(generate, model, pages, more, vision_spans=copies)
        except torch.cuda.OutOfMemoryError:
            row.status = "oom"
            rows.append(row)
            break
        finally:
            del noise, copies
        decode_s = max(full_s - prefill_s, 1e-9)
        row.prefill_tokens_per_s = batch * prompt / prefill_s
        row.prefill_ms_per_page = prefill_s * 1000 / batch
        row.decode_tokens_per_s = batch * args.decode_steps / decode_s
        row.decode_ms_per_step = decode_s * 1000 / args.decode_steps
        row.peak_gpu_mem_gib = torch.cuda.max_memory_allocated() / 2**30
        if bandwidth:
            context = prompt + 1 + args.decode_steps // 2  # mean context over the decode steps
            roof = decode_roofline_tokens_per_s(model.config, batch, context, bandwidth)
            row.roofline_tokens_per_s = roof
            row.roofline_fraction = row.decode_tokens_per_s / roof
        rows.append(row)
        print(format_row(row), flush=True)
        batch *= 2
    return rows


def format_row(row: Measurement) -> str:
    def number(value: float | None, pattern: str) -> str:
        return format(value, pattern) if value is not None else "-"

    return (
        f"{row.mode:<7} {row.batch_size:>5} {row.prompt_tokens:>6} "
        f"{number(row.encode_ms_per_page, '9.1f')} {number(row.prefill_tokens_per_s, '11.0f')} "
        f"{number(row.decode_tokens_per_s, '10.0f')} {number(row.decode_ms_per_step, '8.2f')} "
        f"{number(row.roofline_fraction, '8.1%')} {number(row.peak_gpu_mem_gib, '8.1f')} "
        f"{row.status}"
    )


HEADER = (
    f"{'mode':<7} {'batch':>5} {'prompt':>6} {'enc ms/pg':>9} {'prefill t/s':>11} "
    f"{'decode t/s':>10} {'ms/step':>8} {'roofline':>8} {'peak GiB':>8} status"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop doubling after this")
    parser.add_argument("--bandwidth-tbs", type=float, help="HBM TB/s for the roofline")
    parser.add_argument("--modes", default=",".join(m.value for m in Mode))
    parser.add_argument("--output", type=Path, default=RESULT_PATH)
    parser.add_argument(
        "--config", type=Path, help="official-format config.json (default: the official sizes)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("model_gpu.py needs a CUDA GPU")

    started = time.perf_counter()
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    bandwidth = (args.bandwidth_tbs or 0) * 1e12 or next(
        (bw for name, bw in HBM_BANDWIDTH.items() if name in gpu), None
    )
    config = (
        DeepseekOcrConfig.from_official_json(args.config) if args.config else DeepseekOcrConfig()
    )
    model = build_random_model(config, device)
    image = synthetic_page()
    print(f"{gpu}; model built in {time.perf_counter() - started:.0f} s\n{HEADER}", flush=True)

    modes = [Mode(m) for m in args.modes.split(",")]
    rows: list[Measurement] = []
    for index, mode in enumerate(modes):
        # Each mode gets an equal share of what is left of the budget.
        remaining = args.budget_s - (time.perf_counter() - started)
        deadline = time.perf_counter() + remaining / (len(modes) - index)
        page = prepare_page_from_ids(
            image, mode, [], SUFFIX_IDS, bos_id=BOS_ID, image_token_id=IMAGE_TOKEN_ID
        )
        with torch.inference_mode():
            rows += measure_mode(model, page, args, deadline, bandwidth)

    print(f"\n{HEADER}")
    for row in rows:
        print(format_row(row))
    largest = {
        mode.value: max(
            (r.batch_size for r in rows if r.mode == mode.value and r.status == "ok"), default=None
        )
        for mode in modes
    }
    print(f"largest batch measured per mode: {largest}")
    payload = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "gpu": gpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": "python " + shlex.join(sys.argv),
        "weights": "random bf16, formula-category scales",
        "decode_steps": args.decode_steps,
        "ngram": {"size": 20, "window": 50},
        "hbm_bandwidth_bytes_per_s": bandwidth,
        "largest_batch": largest,
        "seconds": round(time.perf_counter() - started, 1),
        "results": [asdict(r) for r in rows],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
