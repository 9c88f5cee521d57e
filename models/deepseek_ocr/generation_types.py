"""What generation takes and gives: settings, a fed page, a page's output, and the helpers that
size and encode pages. Kept apart from the generator so the one-shot `generation.generate` and
the long-lived `generator.Generator` share them without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from models.deepseek_ocr.decode_step import TABLE_CELL_TOKEN_IDS
from models.deepseek_ocr.geometry import MAX_TILES, view_sides
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM
from models.deepseek_ocr.processor import PageInputs
from models.deepseek_ocr.vision import encoder_batch_size_set
from models.engine import FinishReason


class ContextLengthError(ValueError):
    """A prompt leaves no room for output within the model's maximum positions."""


class TextDecoder(Protocol):
    """What generation needs from a tokenizer (see `tokenizer.DeepseekOcrTokenizer`)."""

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str: ...


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy decoding settings; the defaults are the official PDF script's.

    `ngram_window` None bans repeats anywhere in the generated text (0 for `ngram_size` turns the
    ban off). `ignore_eos` keeps going to the length limit, for benchmarks. `max_batch` is the
    number of sequences decoded together (cache slots); `prefill_tokens` bounds the padded tokens
    of one prefill forward; `views_per_batch` bounds the vision encoder's batch. `admit_pages`
    caps how many freed slots a running batch waits for before it refills them, and
    `admit_wait_s` how long pages that arrive fewer than that wait to be admitted together
    (`Generator`).
    """

    max_new_tokens: int = 8192
    eos_token_id: int = 1
    ngram_size: int = 20
    ngram_window: int | None = 50
    ngram_whitelist: frozenset[int] = TABLE_CELL_TOKEN_IDS
    ignore_eos: bool = False
    max_batch: int = 64
    prefill_tokens: int = 32768
    views_per_batch: int | None = 32
    admit_pages: int = 32
    admit_wait_s: float = 0.5
    encode_thread: bool = False  # admitted pages encoded beside decoding (`encoder_thread`)
    keep_logits: bool = False  # return each step's raw and processed logits (parity checks)
    cuda_graphs: bool = True  # pad decode steps to shape buckets; on CUDA, replay them as graphs


@dataclass(frozen=True, eq=False)
class FedPage:
    """A page handed to a generation. `key` is the caller's own (an index, a request), so a
    finished page can be matched to what it came from; `vision_span` `(N, C)` skips the vision
    encoder for a page already encoded."""

    key: object
    inputs: PageInputs
    max_new_tokens: int | None = None
    vision_span: torch.Tensor | None = None


@dataclass
class PageGeneration:
    """One page's output. `token_ids` include the EOS when one was generated; `text` does not.

    `encode_ms` is the page's share (by placeholders) of its admission group's vision encoding;
    `decode_ms` the wall time from the page's prefill to its last token, which overlaps its
    batch-mates'; `gpu_ms` the page's share of the device time: its encoding share plus, for
    its prefill and every decode step, the step's time divided among the rows it ran, so the
    pages of a run sum to the run's device time (not about batch size times it).
    """

    token_ids: list[int]
    text: str | None
    finish_reason: FinishReason
    placeholder_tokens: int
    valid_vision_tokens: int
    prompt_tokens: int
    output_tokens: int
    encode_ms: float
    decode_ms: float
    gpu_ms: float
    logits: torch.Tensor | None = None  # (output_tokens, V) raw, with keep_logits
    scores: torch.Tensor | None = None  # (output_tokens, V) after the n-gram ban

    @property
    def text_token_ids(self) -> list[int]:
        """The ids the text is decoded from: the EOS is not text."""
        eos = self.finish_reason is FinishReason.EOS
        return self.token_ids[:-1] if eos else self.token_ids


def output_limits(
    pages: Sequence[PageInputs],
    settings: GenerationSettings,
    max_positions: int,
    max_new_tokens: Sequence[int | None] | None = None,
) -> list[int]:
    """Per page: the smaller of the settings', the page's own and the context's output limit."""
    overrides = max_new_tokens or [None] * len(pages)
    limits = []
    for page, override in zip(pages, overrides, strict=True):
        room = max_positions - len(page.input_ids)
        if room <= 0:
            raise ContextLengthError(
                f"prompt of {len(page.input_ids)} tokens leaves no room within "
                f"{max_positions} positions"
            )
        limits.append(min(settings.max_new_tokens, override or settings.max_new_tokens, room))
    return limits


def encode_pages(
    model: DeepseekOcrForCausalLM,
    pages: Sequence[PageInputs],
    settings: GenerationSettings | None = None,
) -> list[torch.Tensor]:
    """Vision spans `(N_i, C)` of the pages, views of equal size encoded together."""
    if not pages:
        return []
    settings = settings or GenerationSettings()
    return model.model.encode_images(
        [p.global_view for p in pages],
        [p.tiles for p in pages],
        [p.tile_grid for p in pages],
        views_per_batch=settings.views_per_batch,
    )


def encoder_shapes(settings: GenerationSettings) -> tuple[list[int], list[int]]:
    """The view sides and encoder batch sizes these settings can give the vision encoder: every
    mode's sides, every batch size `encoder_batch_sizes` makes of an admission's views."""
    limit = settings.views_per_batch
    return view_sides(), encoder_batch_size_set(
        limit, limit or settings.admit_pages * (MAX_TILES + 1)
    )


def warm_up_encoder(model: DeepseekOcrForCausalLM, settings: GenerationSettings) -> int:
    """Encode blank views of every shape these settings can give the vision encoder
    (`encoder_shapes`), so that no admitted page waits for cuDNN's first-use plans
    (`DeepEncoder.warm_up`); the shapes encoded."""
    with torch.inference_mode():
        return model.model.warm_up(*encoder_shapes(settings))


def vision_spans(
    model: DeepseekOcrForCausalLM, pages: Sequence[FedPage], settings: GenerationSettings
) -> list[torch.Tensor]:
    """The fed pages' vision spans: precomputed ones kept, the others encoded together."""
    encoded = iter(
        encode_pages(model, [p.inputs for p in pages if p.vision_span is None], settings)
    )
    return [next(encoded) if p.vision_span is None else p.vision_span for p in pages]


__all__ = [
    "ContextLengthError",
    "FedPage",
    "GenerationSettings",
    "PageGeneration",
    "TextDecoder",
    "encode_pages",
    "encoder_shapes",
    "output_limits",
    "vision_spans",
    "warm_up_encoder",
]
