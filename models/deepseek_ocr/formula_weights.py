"""Deterministic formula weights of the parity oracle (`reference/parity/README.md` §3).

The official weights cannot be downloaded here, so parity is checked against golden outputs of
the official code run with weights that anyone can regenerate from a tensor's name and shape:
a CRC-32 seed, a Weyl sequence and the MurmurHash3 finalizer give `u` in [-0.5, 0.5), scaled by
the tensor's category. The integer steps run in numpy uint32, whose wrap-around *is* the
formula's `mod 2^32`; the scaling runs in float64 and is rounded once to float32, as specified.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

WEYL_MULTIPLIER = 2654435761  # M
SEED_MULTIPLIER = 40503  # K
NORM_GAIN = 0.1
SMALL_GAIN = 0.02
# Elements generated per step; bounds the float64 scratch memory at ~8 bytes x this.
CHUNK_ELEMENTS = 1 << 24

Category = Literal["norm", "small", "dense"]

_NORM_MARKERS = ("norm", "layer_norm", "layrnorm", "neck.1.", "neck.3.")
_SMALL_MARKERS = (
    "pos_embed",
    "rel_pos_h",
    "rel_pos_w",
    "class_embedding",
    "position_embedding",
    "image_newline",
    "view_seperator",
    "embed_tokens",
)


def weight_category(name: str, shape: Sequence[int]) -> Category:
    """The first matching rule of README §3 step 5."""
    if len(shape) == 1 and name.endswith(".weight") and any(m in name for m in _NORM_MARKERS):
        return "norm"
    if name.endswith(".bias") or any(m in name for m in _SMALL_MARKERS):
        return "small"
    return "dense"


def fan_in(shape: Sequence[int]) -> int:
    return math.prod(shape[1:])


def mixed_uniform(seed: int, start: int, stop: int) -> np.ndarray:
    """`u_i` for `i` in [start, stop) as float64, exactly (README §3 steps 2-4)."""
    index = np.arange(start, stop, dtype=np.uint64).astype(np.uint32)
    offset = np.uint32((seed * SEED_MULTIPLIER) % 2**32)
    x = index * np.uint32(WEYL_MULTIPLIER) + offset  # uint32 arithmetic wraps mod 2^32
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    x *= np.uint32(0xC2B2AE35)
    x ^= x >> np.uint32(16)
    return x.astype(np.float64) / 2.0**32 - 0.5


def formula_array(name: str, shape: Sequence[int]) -> np.ndarray:
    """The float32 tensor README §3 defines for checkpoint key `name` and `shape` (C order)."""
    seed = zlib.crc32(name.encode("utf-8"))
    category = weight_category(name, shape)
    gain = math.sqrt(12.0 / fan_in(shape)) if category == "dense" else 0.0
    count = math.prod(shape)
    out = np.empty(count, dtype=np.float32)
    for start in range(0, count, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, count)
        u = mixed_uniform(seed, start, stop)
        if category == "norm":
            out[start:stop] = 1.0 + NORM_GAIN * u
        elif category == "small":
            out[start:stop] = SMALL_GAIN * u
        else:
            out[start:stop] = u * gain
    return out.reshape(tuple(shape))


def formula_tensor(name: str, shape: Sequence[int]) -> torch.Tensor:
    return torch.from_numpy(formula_array(name, shape))


@torch.no_grad()
def fill_with_formula(model: nn.Module) -> None:
    """Overwrite every entry of `model.state_dict()` with its formula value, in place.

    Works tensor by tensor in the model's own dtype and device, so a full-size bf16 model on a
    GPU never needs a float32 copy of all 3.3 B values.
    """
    for name, tensor in model.state_dict().items():
        tensor.copy_(formula_tensor(name, tensor.shape))


__all__ = [
    "Category",
    "fill_with_formula",
    "formula_array",
    "formula_tensor",
    "mixed_uniform",
    "weight_category",
]
