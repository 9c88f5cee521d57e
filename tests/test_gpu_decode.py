"""The GPU decode path on a real GPU (`gpu` marker; skipped without CUDA).

The full-size architecture with random bf16 weights (bench/model_gpu.py's scaled init), CUDA
graphs on, as a user of `generate` or of `OCRFLOW_ENGINE=deepseek` drives it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from infra.vocabulary import Mode
from models.deepseek_ocr.generation import generate
from models.deepseek_ocr.generation_types import GenerationSettings
from models.deepseek_ocr.resident import resident_generator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GOLDEN_DIR = Path(__file__).parent / "data" / "reference" / "parity"


@pytest.fixture(scope="module")
def model():
    from bench.model_gpu import build_random_model
    from models.deepseek_ocr.config import DeepseekOcrConfig

    return build_random_model(DeepseekOcrConfig(), torch.device("cuda"))


@pytest.fixture(scope="module")
def pages():
    from bench.gpu_throughput import page_variants

    return {mode: page_variants(mode, 8, seed=i) for i, mode in enumerate((Mode.BASE, Mode.GUNDAM))}


def run(model, pages, mode: Mode, batch: int, tokens: int):
    chosen = [pages[mode][i % len(pages[mode])] for i in range(batch)]
    settings = GenerationSettings(max_new_tokens=tokens, ignore_eos=True, max_batch=batch)
    outputs = generate(model, chosen, settings)
    torch.cuda.synchronize()
    assert [len(o.token_ids) for o in outputs] == [tokens] * batch
    return outputs


@torch.inference_mode()
def test_generate_calls_of_growing_batch_in_one_process_do_not_crash(model, pages) -> None:
    """The sequence that killed the process with cudaErrorStreamCaptureInvalidated: Gundam at
    batch 1, 32, 128, each twice, then Base and Gundam again. Each call reaches new (rows, key
    length) buckets, so captures happen all through the run, while earlier calls' generators are
    being replaced."""
    resident = resident_generator(model)
    for batch in (1, 32, 128):
        for _ in range(2):
            run(model, pages, Mode.GUNDAM, batch, tokens=300)
            assert resident.generator is not None and resident.generator.graph_count > 0
    replacements = resident.replacements
    run(model, pages, Mode.GUNDAM, 128, tokens=300)
    assert resident.replacements == replacements  # a call that fits reuses generator and graphs
    run(model, pages, Mode.BASE, 64, tokens=200)
    run(model, pages, Mode.GUNDAM, 16, tokens=400)
    resident.release()
    assert resident.generator is None


@torch.inference_mode()
def test_graphs_are_released_on_purpose_and_memory_returns(model, pages) -> None:
    from models.deepseek_ocr.serving import kv_bytes_per_token

    resident = resident_generator(model)
    run(model, pages, Mode.BASE, 32, tokens=100)
    generator = resident.generator
    assert generator is not None and generator.graph_count > 0
    cache_bytes = (
        generator.num_slots
        * generator.cache.capacity
        * kv_bytes_per_token(model.config.decoder, model.lm_head.weight.dtype)
    )
    torch.cuda.synchronize()
    live = torch.cuda.memory_allocated()
    resident.release()  # frees even though this test still holds the generator
    torch.cuda.synchronize()
    assert generator.graph_count == 0
    assert live - torch.cuda.memory_allocated() >= cache_bytes  # the whole cache came back


def test_graphs_captured_ahead_cover_the_run_and_change_no_token(model, pages) -> None:
    """A worker captures its decode graphs before its first page (`capture_graphs`): every
    bucket, so the run that follows captures none, and the pages decode to the tokens they
    decode to on a generator that captured each graph on first use."""
    from models.deepseek_ocr.generation_types import FedPage
    from models.deepseek_ocr.generator import Generator

    chosen = pages[Mode.BASE][:3] + pages[Mode.GUNDAM][:3]
    limits = [40, 9, 23, 31, 5, 17]
    settings = GenerationSettings(max_new_tokens=40, ignore_eos=True, max_batch=4)
    capacity = max(len(page.input_ids) for page in chosen) + max(limits)

    def decode(ahead: bool) -> list[list[int]]:
        generator = Generator(model, settings, num_slots=4, capacity=capacity)
        try:
            if ahead:
                captured = generator.capture_graphs(seconds=600)
                assert (
                    captured
                    == generator.graph_count
                    == len(list(generator.bucketed_step.buckets()))
                )
            fed = [
                FedPage(i, page, n) for i, (page, n) in enumerate(zip(chosen, limits, strict=True))
            ]
            outputs = generator.run_all(fed)
            if ahead:
                assert generator.graph_count == captured  # nothing left to capture mid-run
            return [outputs[page].token_ids for page in fed]
        finally:
            generator.release()

    assert decode(ahead=True) == decode(ahead=False)


def test_steps_launched_ahead_decode_as_steps_read_back_one_by_one(model, pages) -> None:
    """The decode loop launches each step before reading the previous one's tokens (pinned
    copies, an event per step; finished pages' slots moved while a step is in flight): the
    tokens are those of reading every step back before launching the next, same shapes."""
    from models.deepseek_ocr.generation_types import FedPage
    from models.deepseek_ocr.generator import Generator

    chosen = pages[Mode.GUNDAM][:4] + pages[Mode.BASE][:4]
    limits = [37, 3, 18, 1, 26, 9, 40, 12]
    settings = GenerationSettings(max_new_tokens=40, ignore_eos=True, max_batch=3)
    capacity = max(len(page.input_ids) for page in chosen) + max(limits)

    def decode(ahead: bool) -> list[list[int]]:
        generator = Generator(model, settings, num_slots=3, capacity=capacity)
        generator.launch_ahead = ahead
        try:
            fed = [FedPage(i, p, n) for i, (p, n) in enumerate(zip(chosen, limits, strict=True))]
            outputs = generator.run_all(fed)
            assert [len(outputs[page].token_ids) for page in fed] == limits
            return [outputs[page].token_ids for page in fed]
        finally:
            generator.release()

    assert decode(ahead=True) == decode(ahead=False)


def test_the_encoder_thread_serves_a_refilling_batch_on_its_own_stream(model, pages) -> None:
    """With `encode_thread`, pages admitted into a running batch are encoded on the encoder's
    CUDA stream from its thread and every page decodes to its length (the tokens against the
    one-thread path are checked on CPU, where batch shapes cannot change them)."""
    from models.deepseek_ocr.generation_types import FedPage
    from models.deepseek_ocr.generator import Generator

    chosen = pages[Mode.GUNDAM][:4] + pages[Mode.BASE][:4]
    limits = [37, 3, 18, 1, 26, 9, 40, 12]
    settings = GenerationSettings(max_new_tokens=40, ignore_eos=True, encode_thread=True)
    capacity = max(len(page.input_ids) for page in chosen) + max(limits)
    generator = Generator(model, settings, num_slots=3, capacity=capacity)
    assert generator.encoder is not None and generator.encoder.stream is not None
    try:
        fed = [FedPage(i, p, n) for i, (p, n) in enumerate(zip(chosen, limits, strict=True))]
        outputs = generator.run_all(fed)
    finally:
        generator.release()
    assert [len(outputs[page].token_ids) for page in fed] == limits
    assert all(outputs[page].encode_ms > 0 for page in fed)


@torch.inference_mode()
def test_free_memory_counts_what_the_allocator_keeps_cached(model) -> None:
    from models.deepseek_ocr.serving import free_device_bytes

    device = model.lm_head.weight.device
    block = torch.empty(4 * 2**30, dtype=torch.uint8, device=device)
    del block  # kept by PyTorch's caching allocator, not given back to the driver
    driver_free, _total = torch.cuda.mem_get_info(device)
    assert free_device_bytes(device) >= driver_free + 4 * 2**30
    torch.cuda.empty_cache()


@torch.inference_mode()
def test_a_generator_built_after_a_released_one_gets_its_memory(model) -> None:
    """The soak's slow calls: the oversized call's generator (no graphs) was released with its
    cache still held by the allocator, the next generator was sized from the driver's free
    memory alone, got one slot, and kept that cap for the rest of the run."""
    from dataclasses import replace

    resident = resident_generator(model)
    settings = GenerationSettings(max_new_tokens=8, max_batch=512)
    oversized = replace(settings, views_per_batch=None, prefill_tokens=1 << 22)
    first = resident.acquire(oversized, num_slots=512, capacity=2048).num_slots
    second = resident.acquire(settings, num_slots=512, capacity=2048)
    assert second.num_slots >= first
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() < 2**30
    resident.release()
    assert resident.memory_ceiling is None


def run_parity(*args: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-m", "models.deepseek_ocr.parity", str(GOLDEN_DIR), "--json", *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert completed.stdout, completed.stderr[-3000:]
    return json.loads(completed.stdout)


def test_float32_parity_on_cuda_captures_graphs_and_passes() -> None:
    """Issue 15's failure: float32 on CUDA took grouped_mm's host-synchronising fallback and
    failed during graph capture; auto now takes the portable kernel there."""
    report = run_parity("--device", "cuda", "--dtype", "float32")
    failed = [item for item in report["items"] if not item["passed"]]
    assert report["passed"], failed


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_parity_passes_with_the_portable_kernel_forced(dtype: str) -> None:
    report = run_parity("--device", "cuda", "--dtype", dtype, "--expert-kernel", "portable")
    failed = [item for item in report["items"] if not item["passed"]]
    assert report["passed"], failed


@torch.inference_mode()
def test_portable_experts_match_grouped_inside_a_cuda_graph(model) -> None:
    """Full-size experts, bf16: the portable kernel agrees with PyTorch's grouped matmul, and a
    CUDA graph captures it (no host sync) and replays it to the same values."""
    from models.deepseek_ocr.decoder import TextMoe
    from models.deepseek_ocr.expert_kernels import ExpertKernel

    moe = next(m for m in model.modules() if isinstance(m, TextMoe))
    experts = moe.experts
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(256, 1280, device="cuda", dtype=torch.bfloat16, generator=generator)
    expert_ids, weights = moe.gate(hidden)
    try:
        experts.kernel = ExpertKernel.GROUPED
        grouped = experts(hidden, expert_ids, weights).float()
        experts.kernel = ExpertKernel.PORTABLE
        portable = experts(hidden, expert_ids, weights).float()
        relative = (portable - grouped).norm() / grouped.norm()
        assert relative < 1e-2  # bf16 outputs of two fp32-accumulating kernels
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = experts(hidden, expert_ids, weights)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured.float(), portable)
    finally:
        experts.kernel = ExpertKernel.AUTO


@torch.inference_mode()
def test_views_staged_through_pinned_memory_match_views_sent_whole(model, pages) -> None:
    """`stage_views` stacks an encoder batch into pinned memory and copies it without blocking;
    the features must be exactly those of the same views stacked on the GPU, and a Gundam
    admission encoded through it must give the same spans as with every view already there."""
    from models.deepseek_ocr.generation_types import encode_pages
    from models.deepseek_ocr.vision import pixel_values_for, stage_views

    gundam = pages[Mode.GUNDAM][:4]
    views = list(gundam[0].tiles)
    staged = stage_views(views, model.lm_head.weight)
    whole = pixel_values_for(torch.stack(views).cuda(), model.lm_head.weight)
    assert torch.equal(staged, whole)
    # More batches than staging buffers, of growing and shrinking sizes, all in flight at once:
    # a buffer rewritten before its copy ran would show in an earlier batch.
    many = views * 3
    batches = [many[:1], many[1:3], many, many[2:], many[:2], many[::-1]]
    staged_all = [stage_views(batch, model.lm_head.weight) for batch in batches]
    for batch, staged in zip(batches, staged_all, strict=True):
        assert torch.equal(
            staged, pixel_values_for(torch.stack(batch).cuda(), model.lm_head.weight)
        )

    from_host = encode_pages(model, gundam)
    on_device = [
        replace(page, global_view=page.global_view.cuda(), tiles=page.tiles.cuda())
        for page in gundam
    ]
    for host_span, device_span in zip(from_host, encode_pages(model, on_device), strict=True):
        assert torch.equal(host_span, device_span)
