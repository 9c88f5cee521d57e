"""Slot-based key/value cache for batched decoding of sequences with different lengths.

Each sequence owns one slot: its keys and values sit at positions `[0, length)` of that slot, so
every sequence keeps its own position ids from 0 and nothing is padded on the left. A forward pass
covers a contiguous range of slots. Slots can be refilled or moved (`move_slot`), which is what
continuous batching needs: a finished sequence's slot is handed to the next page.

The lengths live twice: on the host (to size steps and check room without a device sync) and on
the device as `positions` (what a decode step reads and advances in place), so a decode step's
device work has static shapes and no host input, and a CUDA graph can capture it.

Legend: S slots, H key/value heads, P capacity (positions per slot), D head dim, B rows of a
forward pass, T tokens per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class CacheCapacityError(ValueError):
    """A step would write past the positions a slot has room for."""


@dataclass(frozen=True)
class CacheStep:
    """What one forward pass reads and writes in the cache.

    A prefill step writes rows from position 0 and attends causally within its own tokens (so
    the fast causal kernels apply); a decode step writes at each row's current length and
    attends over the first `key_length` cached keys through `attention_mask` (`key_length` may
    exceed the longest row: the extra keys are masked), or, through the decode-attention kernel,
    over each row's first `row_lengths` keys alone (so no row reads another row's padding).
    """

    cache: KVCache
    first_slot: int
    position_ids: torch.Tensor  # (B, T) absolute positions of the step's tokens
    is_prefill: bool
    key_length: int  # cached positions a decode step attends to (longest row)
    attention_mask: torch.Tensor | None  # (B, 1, T, key_length) bool, decode only
    slot_index: torch.Tensor | None  # (B, 1) slot of each row, decode only (for scattered writes)
    # (B,) keys each row's last token attends to, at most key_length, on the device; decode only
    row_lengths: torch.Tensor | None = None

    @property
    def slots(self) -> slice:
        return slice(self.first_slot, self.first_slot + self.position_ids.shape[0])

    def update(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's `(B, H, T, D)` keys/values and return those to attend to: a prefill
        step's own, or views `(B, H, key_length, D)` of the cache for a decode step."""
        layer_keys = self.cache.keys[layer_idx]
        layer_values = self.cache.values[layer_idx]
        if self.is_prefill:
            length = keys.shape[2]
            layer_keys[self.slots, :, :length] = keys
            layer_values[self.slots, :, :length] = values
            return keys, values
        # Advanced indices on dims 0 and 2 put their (B, T) shape first: (B, T, H, D).
        layer_keys[self.slot_index, :, self.position_ids] = keys.transpose(1, 2)
        layer_values[self.slot_index, :, self.position_ids] = values.transpose(1, 2)
        return (
            layer_keys[self.slots, :, : self.key_length],
            layer_values[self.slots, :, : self.key_length],
        )


class KVCache:
    """Keys and values of up to `num_slots` sequences, `capacity` positions each, per layer.

    `lengths` (host side, so no device sync is needed to size a step) counts the positions each
    slot holds. Creating a step reserves its positions: the lengths advance at once.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_slots, num_kv_heads, capacity, head_dim)  # (S, H, P, D)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.lengths = [0] * num_slots
        self.device = torch.device(device)
        self.positions = torch.zeros(num_slots, dtype=torch.long, device=device)  # (S,) = lengths

    @property
    def num_slots(self) -> int:
        return len(self.lengths)

    def free(self) -> None:
        """Drop the keys and values now, whoever still holds this cache."""
        self.keys.clear()
        self.values.clear()

    def prefill_step(self, first_slot: int, prompt_lengths: Sequence[int]) -> CacheStep:
        """A step that fills slots `first_slot, ...` with right-padded prompts.

        Rows are padded to the longest prompt; positions past a row's own length hold padding
        keys that no later step attends to and that decoding overwrites.
        """
        num_tokens = max(prompt_lengths)
        self._check_room(first_slot, len(prompt_lengths), [0] * len(prompt_lengths), num_tokens)
        for row, length in enumerate(prompt_lengths):
            self.lengths[first_slot + row] = length
        rows = slice(first_slot, first_slot + len(prompt_lengths))
        self.positions[rows] = torch.tensor(prompt_lengths, device=self.device)
        positions = torch.arange(num_tokens, device=self.device)
        return CacheStep(
            cache=self,
            first_slot=first_slot,
            position_ids=positions.expand(len(prompt_lengths), num_tokens),
            is_prefill=True,
            key_length=num_tokens,
            attention_mask=None,
            slot_index=None,
        )

    def decode_step(self, first_slot: int, num_rows: int, num_tokens: int = 1) -> CacheStep:
        """A step that appends `num_tokens` tokens to each of `num_rows` slots."""
        key_length = self.reserve(first_slot, num_rows, num_tokens)
        return self.device_step(first_slot, num_rows, key_length, num_tokens)

    def reserve(self, first_slot: int, num_rows: int, num_tokens: int = 1) -> int:
        """The host half of a decode step: check room, advance the host lengths, and return the
        key length the step needs (its longest row after the step)."""
        starts = self.lengths[first_slot : first_slot + num_rows]
        self._check_room(first_slot, num_rows, starts, num_tokens)
        for row in range(num_rows):
            self.lengths[first_slot + row] += num_tokens
        return max(starts) + num_tokens

    def device_step(
        self, first_slot: int, num_rows: int, key_length: int, num_tokens: int = 1
    ) -> CacheStep:
        """The device half of a decode step: positions read from `positions` and advanced there.

        No host data and no sync, so a CUDA graph can capture it. Rows whose slot holds no live
        sequence (a graph's padding rows) are clamped into the cache; their output is ignored.
        """
        rows = slice(first_slot, first_slot + num_rows)
        offsets = torch.arange(num_tokens, device=self.device)
        position_ids = (self.positions[rows, None] + offsets).clamp(max=self.capacity - 1)  # (B, T)
        self.positions[rows] += num_tokens
        key_positions = torch.arange(key_length, device=self.device)
        # Query at position p sees keys 0..p of its own slot; longer rows' extra keys are masked.
        attention_mask = key_positions[None, None, :] <= position_ids[:, :, None]  # (B, T, K)
        # The same for the kernel that reads only each row's valid keys; padding rows of a graph
        # (free slots, any position) are held within the bucket like the mask holds them.
        row_lengths = (position_ids[:, -1] + 1).clamp(max=key_length)  # (B,)
        return CacheStep(
            cache=self,
            first_slot=first_slot,
            position_ids=position_ids,
            is_prefill=False,
            key_length=key_length,
            attention_mask=attention_mask[:, None],  # (B, 1, T, K)
            slot_index=torch.arange(first_slot, first_slot + num_rows, device=self.device)[:, None],
            row_lengths=row_lengths,
        )

    def move_slot(self, source: int, target: int) -> None:
        """Copy slot `source` into slot `target` (to keep live sequences in contiguous slots)."""
        length = self.lengths[source]
        for layer_keys, layer_values in zip(self.keys, self.values, strict=True):
            layer_keys[target, :, :length] = layer_keys[source, :, :length]
            layer_values[target, :, :length] = layer_values[source, :, :length]
        self.lengths[target] = length
        self.positions[target] = self.positions[source]

    def _check_room(
        self, first_slot: int, num_rows: int, starts: Sequence[int], num_tokens: int
    ) -> None:
        if first_slot + num_rows > self.num_slots:
            raise CacheCapacityError(
                f"slots {first_slot}..{first_slot + num_rows - 1} requested, "
                f"cache has {self.num_slots}"
            )
        needed = max(starts) + num_tokens
        if needed > self.capacity:
            raise CacheCapacityError(
                f"a step needs {needed} positions per slot, cache capacity is {self.capacity}"
            )


__all__ = ["CacheCapacityError", "CacheStep", "KVCache"]
