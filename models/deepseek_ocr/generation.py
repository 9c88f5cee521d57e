"""Batched greedy generation for a given list of pages of any mix of modes.

`generate` decodes on the model's resident generator (`resident.ResidentGenerator`): at most
`max_batch` sequences decode together, and a finished sequence's slot is refilled with the next
page at once (continuous batching), so `max_batch` bounds memory, not the number of pages. The
generator, its cache and its CUDA graphs outlive the call and serve the next one that fits; a
resident worker feeds the same generator pages as it goes (`engine.serve`).

The settings, page and output types live in `generation_types`; the decode step in
`decode_step`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.deepseek_ocr.generation_types import (
    FedPage,
    GenerationSettings,
    PageGeneration,
    TextDecoder,
    output_limits,
)
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM
from models.deepseek_ocr.processor import PageInputs
from models.deepseek_ocr.resident import resident_generator


@torch.inference_mode()
def generate(
    model: DeepseekOcrForCausalLM,
    pages: Sequence[PageInputs],
    settings: GenerationSettings | None = None,
    tokenizer: TextDecoder | None = None,
    max_new_tokens: Sequence[int | None] | None = None,
    vision_spans: Sequence[torch.Tensor] | None = None,
) -> list[PageGeneration]:
    """Greedy-decode every page (any mix of modes); results in input order.

    `max_new_tokens` optionally lowers the limit per page. With a tokenizer, each result
    carries its decoded text (special tokens kept, EOS dropped). `vision_spans` skips the
    vision encoder for pages already encoded (the parity command compares the spans first).
    Out of memory retries the pages in smaller batches; an error of a page alone is raised.
    """
    if not pages:
        return []
    settings = settings or GenerationSettings()
    limits = output_limits(
        pages, settings, model.config.decoder.max_position_embeddings, max_new_tokens
    )
    spans = list(vision_spans) if vision_spans is not None else [None] * len(pages)
    fed = [
        FedPage(index, page, limit, span)
        for index, (page, limit, span) in enumerate(zip(pages, limits, spans, strict=True))
    ]
    resident = resident_generator(model)
    with resident.lock:
        generator = resident.acquire(
            settings,
            num_slots=min(settings.max_batch, len(pages)),
            capacity=max(
                len(page.input_ids) + limit for page, limit in zip(pages, limits, strict=True)
            ),
            tokenizer=tokenizer,
        )
        outputs = generator.run_all(fed)
    return [outputs[page] for page in fed]
