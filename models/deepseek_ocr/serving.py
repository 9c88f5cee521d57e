"""Sizing a resident DeepSeek-OCR worker: how many sequences its GPU memory decodes at once.

Each sequence holds keys and values for its whole context (12 layers x 2 x 1280 x 2 B = 61,440 B
per token in bf16). A resident worker allocates its cache once, every slot long enough for the
longest prompt plus the output limit (`slot_capacity`), so pages of any mode can be fed into any
free slot for the worker's life; the slots a card holds follow from its free memory.
"""

from __future__ import annotations

import torch

from infra.vocabulary import Mode
from models.deepseek_ocr.config import DecoderConfig
from models.deepseek_ocr.geometry import (
    MAX_TILES,
    MODE_GEOMETRY,
    SMALL_GPU_MAX_TILES,
    TILE_GRID_CANDIDATES,
    queries_per_side,
)
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM

PROMPT_TEXT_TOKENS = 16  # BOS and the prompt words around `<image>` (the official prompts: < 16)
# Room kept free for the vision encoder (SAM's global attention over 64x64 patches per view,
# `views_per_batch` views at once), prefill activations and the allocator's fragmentation: 24 GiB
# on a large card, a quarter of a small one (a 24 GiB card keeps 6 GiB and still gets slots).
ACTIVATION_RESERVE_BYTES = 24 * 2**30
ACTIVATION_RESERVE_SHARE = 0.25
MAX_SLOTS = 1024
# Below this much device memory a card counts as small: Gundam pages get at most 6 crops.
SMALL_GPU_BYTES = 40 * 2**30


def kv_bytes_per_token(config: DecoderConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of keys and values one cached token holds over all layers."""
    item = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * item


def max_prompt_tokens() -> int:
    """The longest prompt any page can have: Gundam with the tallest or widest tile grid."""
    geometry = MODE_GEOMETRY[Mode.GUNDAM]
    global_side = queries_per_side(geometry.base_size)
    tile_side = queries_per_side(geometry.image_size)
    tiles = max((tile_side * h) * (tile_side * w + 1) for w, h in TILE_GRID_CANDIDATES)
    return tiles + global_side * (global_side + 1) + 1 + PROMPT_TEXT_TOKENS


def slot_capacity(config: DecoderConfig, max_new_tokens: int) -> int:
    """Positions per slot of a resident generator: any page's prompt plus its output limit."""
    return min(config.max_position_embeddings, max_prompt_tokens() + max_new_tokens)


def activation_reserve(device: torch.device) -> int:
    """Bytes to leave free beside the cache on `device` (see `ACTIVATION_RESERVE_BYTES`)."""
    total = torch.cuda.get_device_properties(device).total_memory
    return min(ACTIVATION_RESERVE_BYTES, int(total * ACTIVATION_RESERVE_SHARE))


def max_tiles_for(device: torch.device) -> int:
    """Gundam's crop cap on `device`: the official 9, or 6 on a card under 40 GiB as the
    official config advises for small GPU memory (fewer tiles, less vision-encoder memory)."""
    if device.type != "cuda":
        return MAX_TILES
    small = torch.cuda.get_device_properties(device).total_memory < SMALL_GPU_BYTES
    return SMALL_GPU_MAX_TILES if small else MAX_TILES


def free_device_bytes(device: torch.device) -> int:
    """Bytes a new allocation on `device` can have: what the driver reports free plus what
    PyTorch's caching allocator holds unused. The allocator hands its unused blocks out again,
    and frees them to the driver before it reports out of memory; counting only the driver's
    figure undercounts by whatever a released cache or a large vision batch left cached."""
    free_bytes, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free_bytes + cached


def slots_that_fit(
    model: DeepseekOcrForCausalLM, capacity: int, reserve_bytes: int | None = None
) -> int:
    """Sequences of `capacity` positions whose KV cache fits in the device's free memory
    (`free_device_bytes`) beside the loaded model and the activation reserve. On CPU, a modest
    fixed number."""
    parameter = model.lm_head.weight
    if parameter.device.type != "cuda":
        return 8
    free_bytes = free_device_bytes(parameter.device)
    reserve = activation_reserve(parameter.device) if reserve_bytes is None else reserve_bytes
    per_slot = kv_bytes_per_token(model.config.decoder, parameter.dtype) * capacity
    return max(1, min(MAX_SLOTS, (free_bytes - reserve) // per_slot))


def slots_for_free_memory(
    model: DeepseekOcrForCausalLM, max_new_tokens: int, reserve_bytes: int | None = None
) -> int:
    """Slots of a resident worker: every slot sized by `slot_capacity`, because the resident
    cache is allocated once for any page."""
    capacity = slot_capacity(model.config.decoder, max_new_tokens)
    return slots_that_fit(model, capacity, reserve_bytes)


__all__ = [
    "activation_reserve",
    "free_device_bytes",
    "kv_bytes_per_token",
    "max_prompt_tokens",
    "max_tiles_for",
    "slot_capacity",
    "slots_for_free_memory",
    "slots_that_fit",
]
