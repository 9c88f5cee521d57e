"""The routed experts' matmuls, on every GPU: PyTorch's grouped kernel or a portable Triton one.

`torch.nn.functional.grouped_mm` has a fused kernel only on Hopper and Blackwell in bfloat16.
Elsewhere (A100, L40S, RTX, T4; or float16/float32 anywhere) PyTorch loops over the groups and
reads their sizes on the host: slow, and a host sync that CUDA graphs cannot capture (the
float32 parity run on an H200 failed in capture for this reason). The portable path here is a
grouped GEMM written in Triton with everything on the device and static launch shapes:

1. `align_assignments` sorts the (token, expert) assignments by expert and pads each expert's
   group to a multiple of the row block, into a buffer sized for the worst case
   (`N*K + E*(BLOCK_M-1)` rows), with the expert of each row block alongside. No sizes leave
   the device, so the launch grid is fixed for a given token count and a graph can capture it.
2. `expert_matmul` runs one program per (row block, column block): it reads its expert's
   weights once, gathers its rows from the (unsorted) input, accumulates in float32 and writes
   each row back at its assignment's own index, so the outputs need no unsorting.

`choose_expert_kernel` picks the path from the device, its capability and the dtype; the
setting `OCRFLOW_EXPERT_KERNEL=auto|grouped|portable` forces one (the portable path is tested
and benchmarked on Hopper this way). With `TRITON_INTERPRET=1` the portable kernel runs on CPU
tensors too, which is how CI checks it without a GPU.

Legend: N tokens, K experts per token, M = N*K assignments, E experts, C input width,
O output width.
"""

from __future__ import annotations

import functools
import os
from enum import StrEnum

import torch


class ExpertKernel(StrEnum):
    AUTO = "auto"
    GROUPED = "grouped"  # torch.nn.functional.grouped_mm
    PORTABLE = "portable"  # the Triton grouped GEMM below


# grouped_mm's fused kernel: compute capability 9.x (Hopper) and 10.x (Blackwell), bfloat16 only.
FUSED_GROUPED_CAPABILITIES = (9, 10)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def kernel_for(
    requested: ExpertKernel | str,
    device_type: str,
    capability: tuple[int, int] | None,
    dtype: torch.dtype,
) -> ExpertKernel:
    """The path the experts take: as requested, or for `auto` the fused grouped kernel where
    PyTorch has one (CUDA capability 9.x/10.x in bfloat16), the portable kernel on any other GPU
    or dtype, and grouped on CPU (no graphs there, so its host loop costs nothing extra;
    `TRITON_INTERPRET=1` makes the portable kernel run on CPU)."""
    requested = ExpertKernel(requested)
    if requested is not ExpertKernel.AUTO:
        return requested
    if device_type != "cuda":
        return ExpertKernel.GROUPED
    fused = capability is not None and capability[0] in FUSED_GROUPED_CAPABILITIES
    return ExpertKernel.GROUPED if fused and dtype == torch.bfloat16 else ExpertKernel.PORTABLE


def choose_expert_kernel(
    requested: ExpertKernel | str, device: torch.device, dtype: torch.dtype
) -> ExpertKernel:
    """`kernel_for` the device a tensor is on."""
    capability = None
    if device.type == "cuda":
        capability = _capability(device.index if device.index is not None else 0)
    return kernel_for(requested, device.type, capability, dtype)


def block_rows(num_assignments: int, num_experts: int) -> int:
    """Rows per program: small blocks when each expert gets few rows (decode), larger when many
    (prefill), so padding wastes little and large groups still use the tensor cores well."""
    per_expert = num_assignments / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64


def align_assignments(
    expert_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(N, K)` expert ids -> padded assignment index per row `(P,)` (-1 for padding) and the
    expert of each block of `block_m` rows `(P / block_m,)` (-1 past the last group).

    P = M + E*(block_m - 1), rounded up to a block: every expert's group fits padded, whatever
    the routing, so shapes depend on N alone. Device work only (no host sync).
    """
    flat = expert_ids.reshape(-1)
    M, device = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    order = flat.argsort(stable=True)  # assignments grouped by expert
    sorted_experts = flat[order]
    rank = torch.arange(M, device=device) - (counts.cumsum(0) - counts)[sorted_experts]
    position = (padded_ends - padded)[sorted_experts] + rank
    num_blocks = -(-(M + num_experts * (block_m - 1)) // block_m)
    rows = torch.full((num_blocks * block_m,), -1, dtype=torch.int32, device=device)
    rows[position] = order.to(torch.int32)
    block_starts = torch.arange(num_blocks, device=device) * block_m
    block_experts = torch.searchsorted(padded_ends, block_starts, right=True)
    block_experts = torch.where(block_starts < padded_ends[-1], block_experts, -1)
    return rows, block_experts.to(torch.int32)


def expert_matmul(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    rows: torch.Tensor,
    block_experts: torch.Tensor,
    *,
    rows_per_input: int,
    num_assignments: int,
    block_m: int,
) -> torch.Tensor:
    """Per assignment r of expert e: `inputs[r // rows_per_input] @ weights[e].T` -> `(M, O)`.

    `weights` is `(E, O, C)` (the checkpoint's layout, as `nn.Linear` keeps it); `rows` and
    `block_experts` come from `align_assignments` with the same `block_m`.
    """
    import triton

    output = inputs.new_empty(num_assignments, weights.shape[1])
    block_n, block_k = 64, 32 if inputs.dtype == torch.float32 else 64
    grid = (block_experts.numel(), triton.cdiv(weights.shape[1], block_n))
    _expert_matmul_kernel()[grid](
        inputs,
        weights,
        output,
        rows,
        block_experts,
        rows_per_input,
        weights.shape[1],
        weights.shape[2],
        inputs.stride(0),
        inputs.stride(1),
        weights.stride(0),
        weights.stride(1),
        weights.stride(2),
        output.stride(0),
        output.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRECISION="ieee" if inputs.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=2 if inputs.dtype == torch.float32 else 3,
    )
    return output


@functools.cache
def _expert_matmul_kernel():
    """The Triton kernel, defined on first use: importing this module needs no Triton (CPU
    builds of PyTorch ship none), and `TRITON_INTERPRET` is read when the kernel is defined."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(
        in_ptr,
        weight_ptr,
        out_ptr,
        rows_ptr,
        block_experts_ptr,
        rows_per_input,
        out_width,
        in_width,
        stride_in_row,
        stride_in_col,
        stride_w_expert,
        stride_w_out,
        stride_w_in,
        stride_out_row,
        stride_out_col,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        expert = tl.load(block_experts_ptr + tl.program_id(0))
        if expert >= 0:
            rows = tl.load(rows_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
            valid = rows >= 0
            in_rows = tl.where(valid, rows // rows_per_input, 0).to(tl.int64)
            cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < out_width
            ks = tl.arange(0, BLOCK_K)
            in_ptrs = in_ptr + in_rows[:, None] * stride_in_row + ks[None, :] * stride_in_col
            w_ptrs = (
                weight_ptr
                + expert.to(tl.int64) * stride_w_expert
                + cols[None, :] * stride_w_out
                + ks[:, None] * stride_w_in
            )  # (BLOCK_K, BLOCK_N): the transposed weight tile
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, in_width, BLOCK_K):
                k_ok = ks + k < in_width
                a = tl.load(in_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                in_ptrs += BLOCK_K * stride_in_col
                w_ptrs += BLOCK_K * stride_w_in
            out_ptrs = (
                out_ptr
                + rows.to(tl.int64)[:, None] * stride_out_row
                + cols[None, :] * stride_out_col
            )
            tl.store(
                out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :]
            )

    return kernel


def triton_available() -> bool:
    """Whether the portable kernel can run: Triton importable, on CUDA or interpreted."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


__all__ = [
    "ExpertKernel",
    "align_assignments",
    "block_rows",
    "choose_expert_kernel",
    "expert_matmul",
    "kernel_for",
    "triton_available",
]
