"""The decode step's attention: which path runs, the split-K kernel's arithmetic (Triton's
interpreter on CPU; bf16 and CUDA-graph replay on a GPU), the decoder's wiring, and prefill
attention kept off cuDNN."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import pytest
import torch
import torch.nn.functional as F

from models.deepseek_ocr import decoder as decoder_module
from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.decode_attention import (
    MAX_SPLITS,
    SETTING,
    DecodeAttention,
    decode_attention_path,
    num_splits,
    path_for,
)
from models.deepseek_ocr.decoder import TextAttention, TextModel
from models.deepseek_ocr.kv_cache import KVCache


@pytest.mark.parametrize(
    ("requested", "device_type", "triton", "expected"),
    [
        ("auto", "cuda", True, DecodeAttention.TRITON),
        ("auto", "cuda", False, DecodeAttention.SDPA),  # no Triton: SDPA, not a crash
        ("auto", "cpu", True, DecodeAttention.SDPA),  # the interpreter is for tests only
        ("sdpa", "cuda", True, DecodeAttention.SDPA),
        ("triton", "cpu", True, DecodeAttention.TRITON),  # forced: TRITON_INTERPRET=1 runs it
    ],
)
def test_auto_takes_the_kernel_on_cuda_only(requested, device_type, triton, expected) -> None:
    assert path_for(requested, device_type, triton) is expected


def test_the_setting_picks_the_path_and_unknown_names_are_refused(monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setenv(SETTING, "triton")
    assert decode_attention_path(cpu) is DecodeAttention.TRITON
    assert decode_attention_path(cpu, DecodeAttention.SDPA) is DecodeAttention.SDPA  # module's
    monkeypatch.setenv(SETTING, "")
    assert decode_attention_path(cpu) is DecodeAttention.SDPA
    monkeypatch.setenv(SETTING, "fastest")
    with pytest.raises(ValueError):
        decode_attention_path(cpu)


def test_splits_fill_the_gpu_at_small_batches_and_vanish_at_large_ones() -> None:
    heads = 10
    assert num_splits(512, heads, 3328) == 1
    assert num_splits(128, heads, 2048) == 1
    assert num_splits(64, heads, 2048) == 2  # 64 x 10 x 2 >= 8 programs per SM of 132
    assert num_splits(8, heads, 2048) == 8  # 14 would fill the GPU; 2048 keys make 8 of 256
    assert num_splits(1, heads, 8192) == MAX_SPLITS
    assert num_splits(1, heads, 128) == 1  # short rows are not split below MIN_SPLIT_KEYS


KERNEL_VS_REFERENCE = textwrap.dedent(
    """
    import json, torch
    import torch.nn.functional as F
    from models.deepseek_ocr.decode_attention import decode_attention
    torch.manual_seed(0)
    # Slots 2.. of a 7-slot cache: rows of 1 key, several blocks and splits, one block exactly,
    # one ending mid-block, one at the full key range (256, a bucket above the longest row).
    first, lengths, key_length, capacity, D = 2, [1, 200, 64, 77, 256], 256, 300, 32
    B, S = len(lengths), 7
    worst = {}
    # float32 only: the interpreter's bf16 dots are wrong (the GPU tests check bf16).
    for dtype in (torch.float32,):
        for H, G in ((4, 4), (4, 2)):
            keys = torch.randn(S, G, capacity, D).to(dtype)
            values = torch.randn(S, G, capacity, D).to(dtype)
            for row, n in enumerate(lengths):  # padding that poisons the output if read
                keys[first + row, :, n:] = float("nan")
                values[first + row, :, n:] = float("nan")
            query = torch.randn(B, H, 1, D).to(dtype)
            reference = torch.cat([
                F.scaled_dot_product_attention(
                    query[row : row + 1].double(),
                    keys[first + row : first + row + 1, :, :n].double(),
                    values[first + row : first + row + 1, :, :n].double(),
                    enable_gqa=True,
                )
                for row, n in enumerate(lengths)
            ])
            rows = slice(first, first + B)
            for splits in (None, 1, 3, 5):
                out = decode_attention(
                    query, keys[rows, :, :key_length], values[rows, :, :key_length],
                    torch.tensor(lengths), splits=splits,
                )
                assert out.dtype == dtype and out.shape == (B, H, 1, D)
                error = (out.double() - reference).abs().max().item()
                key = f"{str(dtype)[6:]} H{H} G{G} splits {splits}"
                worst[key] = error if error == error else float("inf")  # NaN: padding was read
    print(json.dumps(worst))
    """
)

DECODER_WITH_KERNEL = textwrap.dedent(
    """
    import json, torch
    from models.deepseek_ocr.config import DeepseekOcrConfig
    from models.deepseek_ocr.decoder import TextModel
    from models.deepseek_ocr.kv_cache import KVCache
    torch.manual_seed(0)
    config = DeepseekOcrConfig.tiny(vocab_size=97).decoder
    model = TextModel(config).eval()
    lengths = [4, 9, 6]
    sequences = [torch.randn(n + 3, config.hidden_size) for n in lengths]
    worst = 0.0
    with torch.no_grad():
        expected = [model(s[None])[0] for s in sequences]
        cache = KVCache(
            num_layers=config.num_hidden_layers, num_slots=5, capacity=40,
            num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
            dtype=torch.float32, device="cpu",
        )
        padded = torch.zeros(3, max(lengths), config.hidden_size)
        for row, n in enumerate(lengths):
            padded[row, :n] = sequences[row][:n]
        model(padded, cache_step=cache.prefill_step(1, lengths))
        for step in range(3):
            cache.reserve(1, 3)
            # A graph bucket's key length, past every row's keys.
            decode = cache.device_step(1, 3, key_length=32)
            tokens = torch.stack([s[n + step] for s, n in zip(sequences, lengths)])[:, None]
            out = model(tokens, cache_step=decode)
            for row, n in enumerate(lengths):
                worst = max(worst, (out[row, 0] - expected[row][n + step]).abs().max().item())
    print(json.dumps(worst))
    """
)


def run_interpreted(script: str) -> object:
    completed = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "TRITON_INTERPRET": "1", SETTING: "triton"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if "only 0-dimensional arrays can be converted" in completed.stderr:
        # Interpreters before Triton 3.9 (with NumPy 2) cannot take a loop bound read from
        # memory; the compiled kernel can (the GPU tests run it).
        pytest.skip("this Triton's interpreter cannot run loops with device-read bounds")
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(find_spec("triton") is None, reason="Triton is not installed")
def test_the_kernel_reads_each_rows_own_keys_and_matches_sdpa() -> None:
    """Triton's interpreter runs the kernel on CPU tensors (it must be set before the kernel is
    defined, hence a fresh interpreter). Keys past each row's length are NaN, so reading one
    fails the comparison. float32, to float32 rounding."""
    worst = run_interpreted(KERNEL_VS_REFERENCE)
    assert len(worst) == 8
    for case, error in worst.items():
        assert error < 1e-5, (case, error)


@pytest.mark.skipif(find_spec("triton") is None, reason="Triton is not installed")
def test_decoding_through_the_kernel_equals_the_full_forward() -> None:
    """The decoder with `OCRFLOW_DECODE_ATTENTION=triton`: ragged rows in slots 1-3, decoded
    with a bucket's key length past every row, give the causal forward's outputs."""
    assert run_interpreted(DECODER_WITH_KERNEL) < 1e-5


def sdpa_reference(query, keys, values, lengths, **_):
    """Each row's attention over its own first `lengths[b]` keys (what the kernel computes)."""
    return torch.cat(
        [
            F.scaled_dot_product_attention(
                query[b : b + 1], keys[b : b + 1, :, :n], values[b : b + 1, :, :n]
            )
            for b, n in enumerate(lengths.tolist())
        ]
    )


def tiny_decoder_run(monkeypatch, path: str) -> tuple[torch.Tensor, list[list[int]]]:
    """Prefill 3 ragged rows into slots 1-3, then 2 decode steps with `path`; the kernel is
    replaced by `sdpa_reference`, recording the row lengths it was given."""
    calls: list[list[int]] = []

    def spy(query, keys, values, lengths, **kwargs):
        assert keys.shape[2] == 16  # the step's key length, not the cache's capacity
        calls.append(lengths.tolist())
        return sdpa_reference(query, keys, values, lengths)

    monkeypatch.setattr(decoder_module, "decode_attention", spy)
    monkeypatch.setenv(SETTING, path)
    config = DeepseekOcrConfig.tiny(vocab_size=97).decoder
    torch.manual_seed(0)
    model = TextModel(config).eval()
    cache = KVCache(
        num_layers=config.num_hidden_layers,
        num_slots=4,
        capacity=24,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        dtype=torch.float32,
        device="cpu",
    )
    outputs = []
    with torch.no_grad():
        model(torch.randn(3, 9, config.hidden_size), cache_step=cache.prefill_step(1, [4, 9, 6]))
        for _ in range(2):
            cache.reserve(1, 3)
            step = cache.device_step(1, 3, key_length=16)
            outputs.append(model(torch.randn(3, 1, config.hidden_size), cache_step=step))
    return torch.cat(outputs), calls


def test_decode_steps_call_the_kernel_with_each_rows_length(monkeypatch) -> None:
    kernel_out, calls = tiny_decoder_run(monkeypatch, "triton")
    layers = DeepseekOcrConfig.tiny(vocab_size=97).decoder.num_hidden_layers
    # Decode steps only (not prefill), once per layer, each row's length after the write.
    assert calls == [[5, 10, 7]] * layers + [[6, 11, 8]] * layers
    sdpa_out, calls = tiny_decoder_run(monkeypatch, "sdpa")
    assert calls == []
    torch.testing.assert_close(kernel_out, sdpa_out, atol=1e-5, rtol=1e-5)


def test_prefill_attention_runs_without_cudnn_and_decode_is_unrestricted(monkeypatch) -> None:
    """cuDNN's SDPA caches a graph per shape on the host without bound; prefill shapes are
    unbounded, so prefill attention must not be offered that backend."""
    seen: list[tuple[bool, bool]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("is_causal", False), torch.backends.cuda.cudnn_sdp_enabled()))
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
    tiny_decoder_run(monkeypatch, "sdpa")
    layers = DeepseekOcrConfig.tiny(vocab_size=97).decoder.num_hidden_layers
    assert seen == [(True, False)] * layers + [(False, cudnn_before)] * 2 * layers
    assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn_before  # restored after prefill


def test_the_decoder_exposes_the_path_per_attention_module() -> None:
    attention = TextAttention(DeepseekOcrConfig.tiny(vocab_size=97).decoder, 0)
    assert attention.decode_kernel is None  # the setting decides


# --- On a GPU ----------------------------------------------------------------------------------


def ragged_case(rows: int, heads: int, head_dim: int, longest: int, first_slot: int):
    """bf16 cache of `first_slot + rows + 3` slots with random ragged lengths up to `longest`
    (one row at 1, one at `longest`); the step's key length is the 128-bucket above it."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    key_length = -(-longest // 128) * 128
    slots, capacity = first_slot + rows + 3, key_length + 64
    shape = (slots, heads, capacity, head_dim)
    keys = torch.randn(shape, generator=generator, device="cuda").to(torch.bfloat16)
    values = torch.randn(shape, generator=generator, device="cuda").to(torch.bfloat16)
    lengths = torch.randint(1, longest + 1, (rows,), generator=generator, device="cuda")
    lengths[0], lengths[-1] = 1, longest
    query = torch.randn(rows, heads, 1, head_dim, generator=generator, device="cuda")
    rows_slice = slice(first_slot, first_slot + rows)
    return (
        query.to(torch.bfloat16),
        keys[rows_slice, :, :key_length],
        values[rows_slice, :, :key_length],
        lengths,
    )


def masked_sdpa(query, keys, values, lengths, dtype=torch.float32):
    """Today's decode path: SDPA over the padded key range with each row's mask."""
    mask = torch.arange(keys.shape[2], device=keys.device)[None, :] < lengths[:, None]
    return F.scaled_dot_product_attention(
        query.to(dtype), keys.to(dtype), values.to(dtype), attn_mask=mask[:, None, None]
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("splits", [None, 4])
@torch.inference_mode()
def test_the_kernel_matches_sdpa_in_bf16_on_cuda(splits) -> None:
    from models.deepseek_ocr.decode_attention import decode_attention

    query, keys, values, lengths = ragged_case(64, 10, 128, 2000, first_slot=5)
    out = decode_attention(query, keys, values, lengths, splits=splits)
    reference = masked_sdpa(query, keys, values, lengths)  # float32
    torch.testing.assert_close(out.float(), reference, atol=1e-2, rtol=1e-2)
    # No further from float32 than PyTorch's own bf16 kernel is.
    bf16_error = (masked_sdpa(query, keys, values, lengths, torch.bfloat16) - reference).abs()
    assert (out.float() - reference).abs().max() <= 1.5 * bf16_error.float().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [64, 4])  # one split per row; several
@torch.inference_mode()
def test_a_captured_kernel_replays_with_the_lengths_on_the_device(rows) -> None:
    """Captured once, replayed after the lengths changed in place: the replay follows the new
    lengths (nothing was read on the host at capture)."""
    from models.deepseek_ocr.decode_attention import decode_attention

    query, keys, values, lengths = ragged_case(rows, 10, 128, 2000, first_slot=5)
    decode_attention(query, keys, values, lengths)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode_attention(query, keys, values, lengths)
    graph.replay()
    torch.testing.assert_close(captured, decode_attention(query, keys, values, lengths))
    lengths.copy_(torch.randint_like(lengths, 1, 2001))
    query.normal_()
    graph.replay()
    eager = decode_attention(query, keys, values, lengths)
    assert torch.equal(captured, eager)
    reference = masked_sdpa(query, keys, values, lengths)
    torch.testing.assert_close(captured.float(), reference, atol=1e-2, rtol=1e-2)
