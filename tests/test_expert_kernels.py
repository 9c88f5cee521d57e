"""The MoE expert path for every GPU: which kernel each device and dtype gets, and the portable
kernel's arithmetic (run by Triton's interpreter on CPU, so CI checks it without a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import pytest
import torch

from models.deepseek_ocr.expert_kernels import ExpertKernel, align_assignments, kernel_for

HOPPER, BLACKWELL, AMPERE, ADA, TURING, VOLTA = (9, 0), (10, 0), (8, 0), (8, 9), (7, 5), (7, 0)


@pytest.mark.parametrize(
    ("device_type", "capability", "dtype", "expected"),
    [
        ("cuda", HOPPER, torch.bfloat16, ExpertKernel.GROUPED),  # H100/H200: fused grouped_mm
        ("cuda", BLACKWELL, torch.bfloat16, ExpertKernel.GROUPED),  # B200
        ("cuda", HOPPER, torch.float16, ExpertKernel.PORTABLE),  # fused kernel is bf16 only
        ("cuda", HOPPER, torch.float32, ExpertKernel.PORTABLE),  # the parity run that crashed
        ("cuda", AMPERE, torch.bfloat16, ExpertKernel.PORTABLE),  # A100
        ("cuda", ADA, torch.bfloat16, ExpertKernel.PORTABLE),  # L40S, RTX 40
        ("cuda", TURING, torch.float16, ExpertKernel.PORTABLE),  # T4
        ("cuda", VOLTA, torch.float16, ExpertKernel.PORTABLE),  # V100
        ("cpu", None, torch.float32, ExpertKernel.GROUPED),  # no graphs on CPU
        ("cpu", None, torch.bfloat16, ExpertKernel.GROUPED),
    ],
)
def test_auto_picks_the_fused_kernel_only_where_pytorch_has_one(
    device_type, capability, dtype, expected
) -> None:
    assert kernel_for("auto", device_type, capability, dtype) is expected


@pytest.mark.parametrize("forced", [ExpertKernel.GROUPED, ExpertKernel.PORTABLE])
@pytest.mark.parametrize("capability", [HOPPER, AMPERE, TURING])
def test_a_forced_kernel_is_used_on_any_gpu(forced, capability) -> None:
    assert kernel_for(forced.value, "cuda", capability, torch.bfloat16) is forced


def test_an_unknown_kernel_name_is_refused() -> None:
    with pytest.raises(ValueError):
        kernel_for("fastest", "cuda", HOPPER, torch.bfloat16)


@pytest.mark.parametrize("block_m", [16, 64])
def test_aligned_assignments_cover_every_assignment_once_in_its_experts_blocks(block_m) -> None:
    generator = torch.Generator().manual_seed(0)
    num_experts, tokens, top_k = 8, 37, 3
    expert_ids = torch.stack(
        [torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(tokens)]
    )
    rows, block_experts = align_assignments(expert_ids, num_experts, block_m)
    # Static size: the worst case, whatever the routing.
    assert rows.numel() % block_m == 0
    assert rows.numel() >= tokens * top_k + num_experts * (block_m - 1)
    assigned = rows[rows >= 0]
    assert sorted(assigned.tolist()) == list(range(tokens * top_k))
    flat = expert_ids.reshape(-1)
    for block, expert in enumerate(block_experts.tolist()):
        block_rows = rows[block * block_m : (block + 1) * block_m]
        members = block_rows[block_rows >= 0]
        if expert < 0:
            assert members.numel() == 0  # past the last group: the program exits
        else:
            assert (flat[members.long()] == expert).all()  # one expert per block
    # Each expert's rows sit in consecutive blocks, in assignment order (stable).
    for expert in range(num_experts):
        mine = [r for r in rows.tolist() if r >= 0 and flat[r] == expert]
        assert mine == sorted(mine)


PORTABLE_VS_GROUPED = textwrap.dedent(
    """
    import json, torch
    from models.deepseek_ocr.config import DeepseekOcrConfig
    from models.deepseek_ocr.decoder import TextExperts
    from models.deepseek_ocr.expert_kernels import ExpertKernel
    torch.manual_seed(0)
    config = DeepseekOcrConfig.tiny().decoder
    experts = TextExperts(config)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.05)
    experts.tie_stacked_weights()
    worst = []
    for tokens in (1, 5, 40):
        hidden = torch.randn(tokens, config.hidden_size)
        ids = torch.stack([torch.randperm(config.n_routed_experts)[: config.num_experts_per_tok]
                           for _ in range(tokens)])
        weights = torch.rand(tokens, config.num_experts_per_tok)
        experts.kernel = ExpertKernel.GROUPED
        grouped = experts(hidden, ids, weights)
        experts.kernel = ExpertKernel.PORTABLE
        portable = experts(hidden, ids, weights)
        worst.append(((portable - grouped).abs().max() / grouped.abs().max()).item())
    print(json.dumps(worst))
    """
)


@pytest.mark.skipif(find_spec("triton") is None, reason="Triton is not installed")
def test_the_portable_kernel_computes_what_grouped_mm_does() -> None:
    """Triton's interpreter runs the kernel on CPU tensors; it must be read at import, hence a
    fresh interpreter. float32 with IEEE dots: agreement to float32 rounding."""
    completed = subprocess.run(
        [sys.executable, "-c", PORTABLE_VS_GROUPED],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    worst = json.loads(completed.stdout.strip().splitlines()[-1])
    assert len(worst) == 3
    assert max(worst) < 1e-5
