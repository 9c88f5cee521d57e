"""DeepSeek-OCR image views and prompt ids, exactly as the official `infer()` builds them.

Pillow does every resize, pad and crop (the official code does too; any other resampler changes
pixel values). Views stay 8-bit pixels until they reach the model's device: a float32 view is
four times the bytes to hold, pickle and copy to the GPU (12 MB for a 1024-px view). The encoder
then applies `normalize_pixels`, torchvision's `ToTensor` + `Normalize(0.5, 0.5)` arithmetic in
float32, on the device. Sizes and counts come from `geometry`, shared with the CPU router.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

from infra.vocabulary import Mode
from models.deepseek_ocr.geometry import (
    MAX_TILES,
    MODE_GEOMETRY,
    TILE_SIZE,
    PageGeometry,
    page_geometry,
)

IMAGE_PLACEHOLDER = "<image>"
# The official pad colour is int(0.5 * 255) per channel; it normalises to -1/255, not 0.
PAD_COLOR = (127, 127, 127)
NORMALIZE_MEAN = 0.5
NORMALIZE_STD = 0.5


class PromptError(ValueError):
    """A prompt that cannot carry one page image (no `<image>`, or more than one)."""


class PromptTokenizer(Protocol):
    """What prompt assembly needs from a tokenizer (see `tokenizer.DeepseekOcrTokenizer`)."""

    bos_id: int
    image_token_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class PageViews:
    """The pixel views of one page, uint8 (see `normalize_pixels` for the model's values).

    `global_view` is `(3, B, B)` with B the mode's base size; `tiles` is `(n, 3, 640, 640)` in
    row-major grid order, with n = 0 when the page is not tiled.
    """

    global_view: torch.Tensor
    tiles: torch.Tensor
    geometry: PageGeometry


@dataclass(frozen=True)
class PageInputs:
    """Everything the model needs for one page: prompt ids, placeholder mask and pixel views.

    `input_ids` and `images_seq_mask` are `(L,)`; the mask is True exactly at the
    `n_placeholders` image-token positions. `tile_grid` is `(w_tiles, h_tiles)`, `(1, 1)`
    without tiles (the official `images_spatial_crop`). The views are uint8 pixels from this
    processor, normalised on the model's device, or floats already normalised (OCR-2's).
    """

    input_ids: torch.Tensor
    images_seq_mask: torch.Tensor
    global_view: torch.Tensor
    tiles: torch.Tensor
    tile_grid: tuple[int, int]
    n_placeholders: int
    valid_vision_tokens: int
    mode: Mode


def orient_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and convert to RGB, as the official `load_image` does."""
    return ImageOps.exif_transpose(image).convert("RGB")


def pixel_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a `(3, H, W)` uint8 tensor."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
    return pixels.permute(2, 0, 1).contiguous()


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as float32 in [-1, 1], on whatever device they are.

    Same float32 operations, in the same order, as torchvision's ToTensor (x / 255) followed by
    Normalize (x - 0.5) / 0.5, so the values match the official views bit for bit (IEEE division
    rounds the same on a GPU as on the CPU).
    """
    return pixels.to(torch.float32).div(255).sub_(NORMALIZE_MEAN).div_(NORMALIZE_STD)


def _global_view_image(image: Image.Image, mode: Mode) -> Image.Image:
    geometry = MODE_GEOMETRY[mode]
    side = geometry.base_size
    if geometry.squashes:
        # Tiny/Small: squash to a square, aspect not kept; the pad below is then a no-op.
        image = image.resize((side, side), Image.Resampling.BICUBIC)
    return ImageOps.pad(image, (side, side), Image.Resampling.BICUBIC, color=PAD_COLOR)


def _tiles_tensor(image: Image.Image, grid: tuple[int, int]) -> torch.Tensor:
    w_tiles, h_tiles = grid
    resized = image.resize((TILE_SIZE * w_tiles, TILE_SIZE * h_tiles), Image.Resampling.BICUBIC)
    canvas = pixel_tensor(resized)  # (3, h*640, w*640)
    tiles = canvas.view(3, h_tiles, TILE_SIZE, w_tiles, TILE_SIZE)
    tiles = tiles.permute(1, 3, 0, 2, 4)  # (h, w, 3, 640, 640): row-major tile order
    return tiles.reshape(h_tiles * w_tiles, 3, TILE_SIZE, TILE_SIZE)


def page_views(image: Image.Image, mode: Mode | str, max_tiles: int = MAX_TILES) -> PageViews:
    """The global view and (Gundam only, at most `max_tiles`) the tiles of a page image."""
    mode = Mode(mode)
    image = orient_rgb(image)
    geometry = page_geometry(mode, image.width, image.height, max_tiles)
    global_view = pixel_tensor(_global_view_image(image, mode))
    if geometry.n_tiles:
        tiles = _tiles_tensor(image, geometry.tile_grid)
    else:
        tiles = torch.empty(0, 3, TILE_SIZE, TILE_SIZE, dtype=torch.uint8)
    return PageViews(global_view=global_view, tiles=tiles, geometry=geometry)


def build_prompt_ids(
    prefix_ids: Sequence[int],
    n_placeholders: int,
    suffix_ids: Sequence[int],
    *,
    bos_id: int,
    image_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[bos] + prefix + [image_token_id] * n + suffix` and its placeholder mask, both `(L,)`.

    No EOS and no role tags: the official "plain" template is just the stripped prompt text.
    """
    ids = [bos_id, *prefix_ids, *([image_token_id] * n_placeholders), *suffix_ids]
    input_ids = torch.tensor(ids, dtype=torch.int64)
    images_seq_mask = torch.zeros(len(ids), dtype=torch.bool)
    start = 1 + len(prefix_ids)
    images_seq_mask[start : start + n_placeholders] = True
    return input_ids, images_seq_mask


def prepare_page_from_ids(
    image: Image.Image,
    mode: Mode | str,
    prefix_ids: Sequence[int],
    suffix_ids: Sequence[int],
    *,
    bos_id: int,
    image_token_id: int,
    max_tiles: int = MAX_TILES,
) -> PageInputs:
    """Model inputs for a page whose prompt text is already tokenized around `<image>`.

    The parity command uses this with the golden set's ids; `prepare_page` uses it after
    tokenizing a text prompt.
    """
    views = page_views(image, mode, max_tiles)
    geometry = views.geometry
    input_ids, images_seq_mask = build_prompt_ids(
        prefix_ids,
        geometry.n_placeholders,
        suffix_ids,
        bos_id=bos_id,
        image_token_id=image_token_id,
    )
    return PageInputs(
        input_ids=input_ids,
        images_seq_mask=images_seq_mask,
        global_view=views.global_view,
        tiles=views.tiles,
        tile_grid=geometry.tile_grid,
        n_placeholders=geometry.n_placeholders,
        valid_vision_tokens=geometry.valid_vision_tokens,
        mode=geometry.mode,
    )


def split_prompt(prompt: str) -> tuple[str, str]:
    """The prompt text before and after its single `<image>`, after the official strip()."""
    parts = prompt.strip().split(IMAGE_PLACEHOLDER)
    if len(parts) != 2:
        raise PromptError(
            f"prompt must contain exactly one {IMAGE_PLACEHOLDER}, found {len(parts) - 1}"
        )
    return parts[0], parts[1]


def prepare_page(
    image: Image.Image,
    mode: Mode | str,
    prompt: str,
    tokenizer: PromptTokenizer,
    max_tiles: int = MAX_TILES,
) -> PageInputs:
    """Model inputs for a page and a text prompt such as `prompts.Prompt.DOCUMENT_MARKDOWN`."""
    prefix, suffix = split_prompt(prompt)
    return prepare_page_from_ids(
        image,
        mode,
        tokenizer.encode(prefix),
        tokenizer.encode(suffix),
        bos_id=tokenizer.bos_id,
        image_token_id=tokenizer.image_token_id,
        max_tiles=max_tiles,
    )
