"""DeepSeek-OCR 2 page inputs from transformers' own `DeepseekOcr2Processor`.

transformers does the preprocessing (global 1024-px view, 0 or 2-6 local 768-px crops when a
side exceeds 768, placeholder expansion to 256 + 144 per crop + 1); this module only splits
its padded batch into per-page inputs for the port's batched generator, which packs its own
batches. The tokenizer is the port's fast tokenizer (BOS added, the 12 OCR special tokens).

The engine prepares one page at a time in a routed budget (`prepare_page`): transformers' image
processor with the rung's crop cap, and the prompt's `<image>` expanded to the page's
placeholders as the processor expands it (a test compares the two at the official setting).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import BatchFeature, DeepseekOcr2Processor
from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import (
    DeepseekOcr2ImageProcessorPil,
)

from infra.vocabulary import Mode
from models.deepseek_ocr.processor import build_prompt_ids, orient_rgb, split_prompt
from models.deepseek_ocr.tokenizer import load_fast_tokenizer
from models.deepseek_ocr2 import geometry


class PlaceholderMismatch(ValueError):
    """The processor's `<image>` placeholders differ from what the page's views produce."""


@dataclass(frozen=True)
class Ocr2PageInputs:
    """One page for the generator, with the fields it reads from OCR-1's `PageInputs`.

    `input_ids` and `images_seq_mask` are `(L,)` without padding; `global_view` is
    `(3, 1024, 1024)`, `tiles` `(n, 3, 768, 768)` (n = 0 untiled). OCR-2 does not stitch tiles,
    so `tile_grid` stays `(1, 1)`; every placeholder carries a vision feature, so
    `valid_vision_tokens` equals `n_placeholders`. `mode` is the budget rung it was prepared
    in (`geometry.CROP_CAPS`); Gundam, the official setting, for processor batches.
    """

    input_ids: torch.Tensor
    images_seq_mask: torch.Tensor
    global_view: torch.Tensor
    tiles: torch.Tensor
    n_placeholders: int
    tile_grid: tuple[int, int] = (1, 1)
    mode: Mode = Mode.GUNDAM

    @property
    def valid_vision_tokens(self) -> int:
        return self.n_placeholders


def build_processor(checkpoint_dir: str | Path | None = None) -> DeepseekOcr2Processor:
    """transformers' processor with its PIL image backend (no torchvision needed) and the port's
    fast tokenizer (the checkpoint's `tokenizer.json` when there is one)."""
    return DeepseekOcr2Processor(
        image_processor=DeepseekOcr2ImageProcessorPil(),
        tokenizer=load_fast_tokenizer(checkpoint_dir),
    )


def placeholders_per_page(processor: DeepseekOcr2Processor, num_tiles: int) -> int:
    """Vision features of a page: the global view's queries (16 x 16 at 1024 px), a tile's
    (12 x 12 at 768 px) per tile, and the view separator. Computed from the geometry, so it
    checks the processor's expansion rather than repeating it."""

    def queries(side: int) -> int:
        per_side = math.ceil(side / processor.patch_size / processor.downsample_ratio)
        return per_side * per_side

    image_processor = processor.image_processor
    global_queries = queries(image_processor.size["height"])
    return global_queries + queries(image_processor.tile_size) * num_tiles + 1


def split_pages(batch: BatchFeature, image_token_id: int) -> list[Ocr2PageInputs]:
    """Per-page inputs from a processor batch of one image per prompt (padding removed)."""
    tile_counts = batch["num_local_patches"].tolist()
    local = batch.get("pixel_values_local")
    tiles = local.split(tile_counts) if local is not None else [None] * len(tile_counts)
    pages = []
    for row, (ids, mask) in enumerate(
        zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ):
        input_ids = ids[mask.bool()]
        page_tiles = tiles[row] if tiles[row] is not None else torch.zeros(0, 3, 0, 0)
        images_seq_mask = input_ids == image_token_id
        pages.append(
            Ocr2PageInputs(
                input_ids=input_ids,
                images_seq_mask=images_seq_mask,
                global_view=batch["pixel_values"][row],
                tiles=page_tiles,
                n_placeholders=int(images_seq_mask.sum()),
            )
        )
    return pages


def prepare_pages(
    processor: DeepseekOcr2Processor, images: Sequence[Image.Image], prompts: Sequence[str]
) -> list[Ocr2PageInputs]:
    """Process pages (one image and one prompt containing `<image>` each) into page inputs,
    checking each page's placeholders against its tile count."""
    batch = processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)
    pages = split_pages(batch, processor.image_token_id)
    for index, page in enumerate(pages):
        expected = placeholders_per_page(processor, len(page.tiles))
        if page.n_placeholders != expected:
            raise PlaceholderMismatch(
                f"page {index}: image placeholders {page.n_placeholders}, vision features "
                f"{expected} ({len(page.tiles)} tiles)"
            )
    return pages


def budget_views(
    image_processor: DeepseekOcr2ImageProcessorPil, image: Image.Image, mode: Mode | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A page's global view `(3, 1024, 1024)` and crops `(k, 3, 768, 768)` in the budget `mode`
    names: at most `geometry.CROP_CAPS[mode]` crops, the tiling being transformers'.

    transformers has no "global view only" for a page over 768 px (without cropping it shrinks
    the global view to 768 px yet still counts 256 queries), so a cap of 0 asks for a single
    crop (the cheapest grid) and drops it: the 1024-px global view is the same whatever the
    crops. The crop count is checked against `geometry`, which the router prices pages with.
    """
    mode = Mode(mode)
    cap = geometry.CROP_CAPS[mode]
    image = orient_rgb(image)
    views = image_processor(
        images=[image],
        crop_to_patches=True,
        min_patches=min(cap, geometry.MIN_CROPS) or 1,
        max_patches=max(cap, 1),
        return_tensors="pt",
    )
    local = views.get("pixel_values_local")
    tiles = local if cap and local is not None else torch.zeros(0, 3, 0, 0)
    expected = geometry.mode_crops(mode, *image.size)
    if len(tiles) != expected:
        raise PlaceholderMismatch(
            f"{mode} page of {image.size}: {len(tiles)} crops, the router priced {expected}"
        )
    return views["pixel_values"][0], tiles


def page_from_ids(
    global_view: torch.Tensor,
    tiles: torch.Tensor,
    mode: Mode | str,
    prefix_ids: Sequence[int],
    suffix_ids: Sequence[int],
    *,
    bos_id: int,
    image_token_id: int,
) -> Ocr2PageInputs:
    """Page inputs from its views and prompt ids: `[bos] + prefix + <image> x n + suffix`, n
    the page's placeholders (what the processor's expansion gives; the GPU benchmarks build
    pages this way without a tokenizer)."""
    n_placeholders = geometry.placeholders(len(tiles))
    input_ids, images_seq_mask = build_prompt_ids(
        prefix_ids, n_placeholders, suffix_ids, bos_id=bos_id, image_token_id=image_token_id
    )
    return Ocr2PageInputs(
        input_ids=input_ids,
        images_seq_mask=images_seq_mask,
        global_view=global_view,
        tiles=tiles,
        n_placeholders=n_placeholders,
        mode=Mode(mode),
    )


def prepare_page(
    processor: DeepseekOcr2Processor, image: Image.Image, prompt: str, mode: Mode | str
) -> Ocr2PageInputs:
    """One page in the budget `mode` names (`budget_views`), its prompt a text with one
    `<image>` such as `Prompt.DOCUMENT_MARKDOWN`."""
    global_view, tiles = budget_views(processor.image_processor, image, mode)
    prefix, suffix = split_prompt(prompt)
    tokenizer = processor.tokenizer
    return page_from_ids(
        global_view,
        tiles,
        mode,
        tokenizer.encode(prefix, add_special_tokens=False),
        tokenizer.encode(suffix, add_special_tokens=False),
        bos_id=tokenizer.bos_token_id,
        image_token_id=processor.image_token_id,
    )


__all__ = [
    "Ocr2PageInputs",
    "PlaceholderMismatch",
    "budget_views",
    "build_processor",
    "page_from_ids",
    "placeholders_per_page",
    "prepare_page",
    "prepare_pages",
    "split_pages",
]
