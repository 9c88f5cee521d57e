"""The model's resident generator on a tiny model (CPU): reuse, growth, and how long a memory cap
lasts. The GPU side (free memory measured, caches given back) is in test_gpu_decode.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.formula_weights import fill_with_formula
from models.deepseek_ocr.generation_types import GenerationSettings
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM
from models.deepseek_ocr.resident import ResidentGenerator

SETTINGS = GenerationSettings(max_new_tokens=8, max_batch=64)


@pytest.fixture
def resident() -> ResidentGenerator:
    model = DeepseekOcrForCausalLM(DeepseekOcrConfig.tiny(vocab_size=512)).eval()
    fill_with_formula(model)
    return ResidentGenerator(model)


def capped(resident: ResidentGenerator, num_slots: int, capacity: int):
    """A resident generator of `num_slots` slots, recorded as memory's limit the way `_build`
    records it when free memory held fewer slots than were asked for (only on a GPU)."""
    generator = resident.acquire(SETTINGS, num_slots=num_slots, capacity=capacity)
    resident.memory_ceiling = (generator.num_slots, generator.cache.capacity)
    return generator


def test_a_call_that_fits_reuses_the_generator(resident: ResidentGenerator) -> None:
    first = resident.acquire(SETTINGS, num_slots=4, capacity=300)
    assert resident.acquire(SETTINGS, num_slots=3, capacity=200) is first
    assert resident.replacements == 0
    grown = resident.acquire(SETTINGS, num_slots=6, capacity=300)
    assert grown is not first and grown.num_slots >= 6 and resident.replacements == 1


def test_a_memory_capped_generator_serves_larger_calls_without_a_rebuild(
    resident: ResidentGenerator,
) -> None:
    generator = capped(resident, num_slots=4, capacity=1024)
    assert resident.acquire(SETTINGS, num_slots=64, capacity=900) is generator
    assert resident.replacements == 0
    longer = resident.acquire(SETTINGS, num_slots=64, capacity=2048)  # more positions: rebuilt
    assert longer is not generator and longer.num_slots == 64


def test_the_memory_cap_ends_with_its_generator(resident: ResidentGenerator) -> None:
    """The soak's slow calls: a cap measured at a moment of low memory pinned every later
    call to it. Released, the next generator is sized anew."""
    capped(resident, num_slots=1, capacity=1024)
    resident.release()
    assert resident.memory_ceiling is None
    assert resident.acquire(SETTINGS, num_slots=32, capacity=900).num_slots == 32


def test_other_settings_are_not_held_to_another_generators_cap(
    resident: ResidentGenerator,
) -> None:
    capped(resident, num_slots=1, capacity=1024)
    oversized = replace(SETTINGS, views_per_batch=None, prefill_tokens=1 << 22)
    generator = resident.acquire(oversized, num_slots=16, capacity=900)
    assert generator.num_slots == 16 and resident.memory_ceiling is None
    back = resident.acquire(SETTINGS, num_slots=32, capacity=900)
    assert back.num_slots == 32


def test_release_frees_the_cache(resident: ResidentGenerator) -> None:
    generator = resident.acquire(SETTINGS, num_slots=2, capacity=128)
    assert generator.cache.keys and isinstance(generator.cache.keys[0], torch.Tensor)
    resident.release()
    assert resident.generator is None and not generator.cache.keys
