"""The generator a loaded model decodes with: one per model, kept across calls, released on purpose.

A `generator.Generator` owns a KV cache and the CUDA graphs captured for its decode steps. Built
per call and dropped, its graphs were freed by the garbage collector at a moment nobody chose,
which killed whatever capture was running then (a later call's). So the model owns one
`ResidentGenerator`: every call that fits reuses its generator, cache and graphs; a call that
needs more (slots, positions, other settings) releases the old generator first (graphs destroyed,
cache freed) and then builds a larger one, grown in steps so a run replaces it a few times at
most. On a GPU the slots are capped by what the free memory holds beside an activation reserve
(`serving.slots_that_fit`, which counts memory PyTorch's allocator holds unused as free); a
cache that still does not fit is halved in slots until it does. Fewer slots than pages only
means more refills (continuous batching), not failure.

A generator capped by memory serves every later call with these settings and no more positions,
whatever slots it asks for, instead of being rebuilt for each (`memory_ceiling`). The cap lasts
as long as that generator: the next one is sized from a fresh measurement, so a moment of low
memory (a vision batch's or a released cache's blocks still cached) cannot shrink every later
call's batch for the rest of the process.
"""

from __future__ import annotations

import logging
import threading

import torch

from models.deepseek_ocr.decode_step import KEY_LENGTH_BUCKET
from models.deepseek_ocr.generation_types import GenerationSettings, TextDecoder
from models.deepseek_ocr.generator import Generator
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM
from models.deepseek_ocr.serving import slots_that_fit

logger = logging.getLogger(__name__)

# Positions grow in steps of this many: a handful of sizes cover any mix of prompts and limits.
CAPACITY_STEP = 8 * KEY_LENGTH_BUCKET


class ResidentGenerator:
    """Owns at most one `Generator` for `model`; `acquire` hands it out, one caller at a time."""

    def __init__(self, model: DeepseekOcrForCausalLM) -> None:
        self.model = model
        self.generator: Generator | None = None
        self.lock = threading.RLock()  # one run at a time: the cache and graphs are shared
        self.replacements = 0  # generators released to make room for a larger one
        self.allocation_shrinks = 0  # caches halved because they did not fit in memory
        # (slots, capacity) of the resident generator when memory gave it fewer slots than
        # asked for; None otherwise, and cleared with that generator.
        self.memory_ceiling: tuple[int, int] | None = None

    def acquire(
        self,
        settings: GenerationSettings,
        *,
        num_slots: int,
        capacity: int,
        tokenizer: TextDecoder | None = None,
    ) -> Generator:
        """The resident generator, replaced only if it cannot serve `num_slots` sequences of
        `capacity` positions with these settings. Hold `lock` while using it."""
        generator = self.generator
        # Set only while a memory-capped generator is resident: more slots did not fit then.
        ceiling = self.memory_ceiling
        capped = ceiling is not None and generator is not None and generator.settings == settings
        if capped and capacity <= ceiling[1]:
            num_slots = min(num_slots, ceiling[0])
        if generator is None or not generator.fits(settings, num_slots, capacity):
            if generator is not None and generator.settings == settings:
                num_slots = max(num_slots, generator.num_slots)
                capacity = max(capacity, generator.cache.capacity)
            generator = self._build(settings, *self._grown(settings, num_slots, capacity))
        generator.tokenizer = tokenizer
        return generator

    def release(self) -> None:
        """Destroy the generator's graphs and free its cache now."""
        with self.lock:
            if self.generator is not None:
                self.generator.release()
                self.generator = None
            self.memory_ceiling = None

    def _grown(
        self, settings: GenerationSettings, num_slots: int, capacity: int
    ) -> tuple[int, int]:
        slots = max(num_slots, min(settings.max_batch, 1 << (num_slots - 1).bit_length()))
        positions = self.model.config.decoder.max_position_embeddings
        return slots, min(positions, -(-capacity // CAPACITY_STEP) * CAPACITY_STEP)

    def _build(self, settings: GenerationSettings, num_slots: int, capacity: int) -> Generator:
        if self.generator is not None:
            self.replacements += 1
        self.release()
        requested = num_slots
        fitting = slots_that_fit(self.model, capacity)  # measured after the release above
        if fitting < num_slots and self.model.lm_head.weight.is_cuda:
            logger.info("%d slots of %d positions fit in free memory", fitting, capacity)
            num_slots = fitting
        while True:
            try:
                self.generator = Generator(
                    self.model, settings, num_slots=num_slots, capacity=capacity
                )
                if num_slots < requested:
                    self.memory_ceiling = (num_slots, capacity)
                return self.generator
            except torch.OutOfMemoryError:
                if num_slots == 1:
                    raise
                self.allocation_shrinks += 1
                if self.allocation_shrinks == 1:
                    logger.warning(
                        "a cache of %d slots x %d positions does not fit in memory; halving "
                        "the slots until it does (logged once)",
                        num_slots,
                        capacity,
                    )
                num_slots //= 2
                torch.cuda.empty_cache()


def resident_generator(model: DeepseekOcrForCausalLM) -> ResidentGenerator:
    """The model's own `ResidentGenerator`, created on first use."""
    resident = model.__dict__.get("resident_generator")
    if resident is None:
        resident = model.__dict__.setdefault("resident_generator", ResidentGenerator(model))
    return resident


__all__ = ["CAPACITY_STEP", "ResidentGenerator", "resident_generator"]
