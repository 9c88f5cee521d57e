"""Attention of a decode step over each row's own cached keys: a split-K Triton kernel.

A batched decode step attends one new token per row over that row's cached keys. The SDPA path
(`TextAttention`) hands every row the keys of the step's longest row, rounded up to the graph
bucket, and masks the rest, so each row streams the padding from HBM too; on an H200 a decode
step is bound by exactly that stream. Here each program reads only its row's valid keys:

1. `_split_kernel`, one program per (row, head, split): the row's valid length, read on the
   device, is cut into `num_splits` equal chunks (whole key blocks); each program runs an online
   softmax in float32 over its chunk, 64 keys at a time, and writes its normalised partial output
   and the chunk's log-sum-exp. Splits are what fill the GPU when rows x heads alone are too few
   programs. Both products are `tl.dot`s (the query repeated to the 16 rows a dot needs): the
   compute is free in a bandwidth-bound kernel, and dots let Triton pipeline the key and value
   tiles through shared memory, which elementwise products do not (on an H200, 4.1 TB/s of valid
   keys/values at batch 512 against 2.5 TB/s).
2. `_combine_kernel`, one program per (row, head), weighs the splits by their log-sum-exp into
   the output. With one split the first kernel writes the output itself and this one is skipped.

Lengths stay on the device and the grid depends only on the row count and the step's key length
(its bucket), so a decode step that calls this is still captured as one CUDA graph per bucket.
With `TRITON_INTERPRET=1` the kernels run on CPU tensors, which is how CI checks them.

`decode_attention_path` picks this kernel or PyTorch's SDPA; the setting
`OCRFLOW_DECODE_ATTENTION=auto|sdpa|triton` (`Settings.decode_attention`, which engines pass to
`set_decode_attention`; a model built directly reads the variable) forces one (auto: the kernel
on CUDA when Triton imports, SDPA otherwise, i.e. on CPU).

Legend: B rows, H query heads, G key/value heads, K keys per row (the step's key length), D
head dim, S splits per row.
"""

from __future__ import annotations

import functools
import math
import os
from enum import StrEnum

import torch

SETTING = "OCRFLOW_DECODE_ATTENTION"
# Keys per program iteration: a (64, D) bf16 tile of keys and one of values, 16 KiB each at D=128;
# three pipeline stages. The best or within 2% of it on an H200 from batch 8 to 512 (swept
# against 32/128 keys, 2-8 warps, 2-4 stages).
BLOCK_KEYS = 64
NUM_WARPS, NUM_STAGES = 4, 3
# tl.dot's smallest row count: the one query is repeated to it.
QUERY_ROWS = 16
# Programs that keep the 132 SMs of an H100/H200 about eight deep: below this many (row, head)
# programs the rows are split (measured: 2 splits at batch 64, 8 at batch 8; none from 128 on).
TARGET_PROGRAMS = 8 * 132
# A split shorter than this saves less than its share of the combine costs.
MIN_SPLIT_KEYS = 256
MAX_SPLITS = 16


class DecodeAttention(StrEnum):
    AUTO = "auto"
    SDPA = "sdpa"  # masked scaled_dot_product_attention over the padded key range
    TRITON = "triton"  # the split-K kernel below


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def path_for(requested: DecodeAttention | str, device_type: str, triton: bool) -> DecodeAttention:
    """The path a decode step takes: as requested, or for `auto` the kernel on CUDA when Triton
    is importable, SDPA elsewhere (CPU builds ship no Triton; the interpreter is for tests)."""
    requested = DecodeAttention(requested)
    if requested is not DecodeAttention.AUTO:
        return requested
    return DecodeAttention.TRITON if device_type == "cuda" and triton else DecodeAttention.SDPA


def decode_attention_path(
    device: torch.device, requested: DecodeAttention | str | None = None
) -> DecodeAttention:
    """`path_for` a tensor's device; `requested` None reads `OCRFLOW_DECODE_ATTENTION`."""
    if requested is None:
        requested = os.environ.get(SETTING, DecodeAttention.AUTO) or DecodeAttention.AUTO
    return path_for(requested, device.type, _triton_importable())


def num_splits(rows: int, heads: int, key_length: int) -> int:
    """Splits per row: enough that rows x heads x splits fills the GPU, none that would be
    shorter than `MIN_SPLIT_KEYS` of the step's key length (one from batch 128 on, at 10 heads)."""
    wanted = -(-TARGET_PROGRAMS // (rows * heads))
    return max(1, min(wanted, -(-key_length // MIN_SPLIT_KEYS), MAX_SPLITS))


def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    *,
    splits: int | None = None,
) -> torch.Tensor:
    """Softmax attention of one query per row over its first `lengths[b]` keys -> `(B, H, 1, D)`.

    `query` is `(B, H, 1, D)`; `keys`/`values` are `(B, G, K, D)` with any strides, typically
    the layer's `(S, G, P, D)` cache sliced to the step's slots and key length (a view: nothing
    is copied); `lengths` `(B,)` on the device, each in `[1, K]` (a row of length 0 gets zeros).
    Keys past a row's length are never read. Scale 1/sqrt(D), float32 scores, softmax and
    accumulation (the weights enter the value product in the cache's dtype, as in flash
    attention); output in the query's dtype. `splits` overrides `num_splits` (tests).
    """
    import triton

    B, H, T, D = query.shape
    G, K = keys.shape[1], keys.shape[2]
    if T != 1 or H % G or keys.shape != values.shape or keys.shape[0] != B or keys.shape[3] != D:
        raise ValueError(
            f"decode_attention takes (B, H, 1, D) queries over (B, G, K, D) keys, H a multiple "
            f"of G; got query {tuple(query.shape)}, keys {tuple(keys.shape)}, "
            f"values {tuple(values.shape)}"
        )
    S = splits if splits is not None else num_splits(B, H, K)
    output = query.new_empty(B, H, 1, D)
    if S > 1:
        partial = torch.empty(B, H, S, D, dtype=torch.float32, device=query.device)
        partial_lse = torch.empty(B, H, S, dtype=torch.float32, device=query.device)
    else:  # the split kernel writes `output` directly
        partial, partial_lse = output, output
    _split_kernel()[(B, H, S)](
        query,
        keys,
        values,
        lengths,
        output,
        partial,
        partial_lse,
        *query.stride()[:2],
        query.stride(3),
        *keys.stride(),
        *values.stride(),
        *output.stride()[:2],
        output.stride(3),
        *(partial.stride() if S > 1 else (0, 0, 0, 0)),
        H // G,
        D,
        # exp2 in the loop: log2(e) folded into the scale (the log-sum-exps stay in base 2).
        math.log2(math.e) / math.sqrt(D),
        NUM_SPLITS=S,
        BLOCK_N=BLOCK_KEYS,
        BLOCK_D=max(16, triton.next_power_of_2(D)),  # a dot's smallest inner size
        QUERY_ROWS=QUERY_ROWS,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    if S > 1:
        _combine_kernel()[(B, H)](
            partial,
            partial_lse,
            output,
            *partial.stride(),
            *output.stride()[:2],
            output.stride(3),
            D,
            NUM_SPLITS=S,
            BLOCK_S=triton.next_power_of_2(S),
            BLOCK_D=triton.next_power_of_2(D),
            num_warps=4,
        )
    return output


@functools.cache
def _split_kernel():
    """Defined on first use: importing this module needs no Triton (CPU builds of PyTorch ship
    none), and `TRITON_INTERPRET` is read when a kernel is defined."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        lengths_ptr,
        out_ptr,
        partial_ptr,
        partial_lse_ptr,
        stride_qb,
        stride_qh,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_ob,
        stride_oh,
        stride_od,
        stride_pb,
        stride_ph,
        stride_ps,
        stride_pd,
        heads_per_kv,
        head_dim,
        scale_log2,
        NUM_SPLITS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        QUERY_ROWS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(lengths_ptr + row).to(tl.int32)
        # Equal whole-block chunks of this row's own length: a short row's splits stay short.
        chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, length)

        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < head_dim
        # tl.dot takes at least 16 rows: the query repeated (every row computes the same; row
        # 0 is kept).
        rows = tl.arange(0, QUERY_ROWS)
        q = tl.load(
            q_ptr + row.to(tl.int64) * stride_qb + head * stride_qh + dims * stride_qd,
            mask=dim_ok,
            other=0.0,
        )
        q = tl.broadcast_to(q[None, :], (QUERY_ROWS, BLOCK_D))
        kv_head = head // heads_per_kv
        k_base = k_ptr + row.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_base = v_ptr + row.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
        offsets = tl.arange(0, BLOCK_N)

        running_max = tl.full((QUERY_ROWS,), float("-inf"), tl.float32)
        running_sum = tl.zeros((QUERY_ROWS,), tl.float32)
        acc = tl.zeros((QUERY_ROWS, BLOCK_D), tl.float32)
        for block_start in range(start, end, BLOCK_N):
            positions = (block_start + offsets).to(tl.int64)
            valid = positions < end
            keys_t = tl.load(
                k_base + positions[None, :] * stride_kn + dims[:, None] * stride_kd,
                mask=dim_ok[:, None] & valid[None, :],
                other=0.0,
            )  # (BLOCK_D, BLOCK_N)
            scores = tl.dot(q, keys_t, input_precision=PRECISION) * scale_log2  # log2 units
            scores = tl.where(valid[None, :], scores, float("-inf"))  # (QUERY_ROWS, BLOCK_N)
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            rescale = tl.exp2(running_max - new_max)
            weights = tl.exp2(scores - new_max[:, None])
            v = tl.load(
                v_base + positions[:, None] * stride_vn + dims[None, :] * stride_vd,
                mask=valid[:, None] & dim_ok[None, :],
                other=0.0,
            )  # (BLOCK_N, BLOCK_D)
            pv = tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
            acc = acc * rescale[:, None] + pv
            running_sum = running_sum * rescale + tl.sum(weights, axis=1)
            running_max = new_max

        first = rows == 0
        acc = tl.sum(tl.where(first[:, None], acc, 0.0), axis=0)  # (BLOCK_D,)
        running_sum = tl.sum(tl.where(first, running_sum, 0.0), axis=0)
        running_max = tl.max(tl.where(first, running_max, float("-inf")), axis=0)
        has_keys = running_sum > 0
        result = tl.where(has_keys, acc / tl.where(has_keys, running_sum, 1.0), 0.0)
        if NUM_SPLITS == 1:
            out = out_ptr + row.to(tl.int64) * stride_ob + head * stride_oh + dims * stride_od
            tl.store(out, result.to(out_ptr.dtype.element_ty), mask=dim_ok)
        else:
            slot = row.to(tl.int64) * stride_pb + head * stride_ph + split * stride_ps
            tl.store(partial_ptr + slot + dims * stride_pd, result, mask=dim_ok)
            lse = tl.where(
                has_keys,
                running_max + tl.log2(tl.where(has_keys, running_sum, 1.0)),
                float("-inf"),
            )
            lse_slot = (row.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS + split
            tl.store(partial_lse_ptr + lse_slot, lse)

    return kernel


@functools.cache
def _combine_kernel():
    """The splits of one (row, head), weighted by their log-sum-exp (base 2)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(
        partial_ptr,
        partial_lse_ptr,
        out_ptr,
        stride_pb,
        stride_ph,
        stride_ps,
        stride_pd,
        stride_ob,
        stride_oh,
        stride_od,
        head_dim,
        NUM_SPLITS: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        splits = tl.arange(0, BLOCK_S)
        split_ok = splits < NUM_SPLITS
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < head_dim
        lse_base = (row.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS
        lse = tl.load(partial_lse_ptr + lse_base + splits, mask=split_ok, other=float("-inf"))
        top = tl.max(lse, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)  # a row without keys: all weights 0
        weights = tl.exp2(lse - top)  # (BLOCK_S,), 0 for empty splits
        total = tl.sum(weights, axis=0)
        base = partial_ptr + row.to(tl.int64) * stride_pb + head * stride_ph
        parts = tl.load(
            base + splits[:, None] * stride_ps + dims[None, :] * stride_pd,
            mask=split_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )  # (BLOCK_S, BLOCK_D)
        result = tl.sum(weights[:, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)
        out = out_ptr + row.to(tl.int64) * stride_ob + head * stride_oh + dims * stride_od
        tl.store(out, result.to(out_ptr.dtype.element_ty), mask=dim_ok)

    return kernel


__all__ = [
    "SETTING",
    "DecodeAttention",
    "decode_attention",
    "decode_attention_path",
    "num_splits",
    "path_for",
]
