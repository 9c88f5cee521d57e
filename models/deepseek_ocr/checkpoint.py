"""Strict loading of an official DeepSeek-OCR checkpoint directory, and a writer for test ones.

A checkpoint directory holds `config.json` and `model*.safetensors` (one file or shards, with
or without `model.safetensors.index.json`). The module names of our model equal the
checkpoint's keys, so loading is a key-for-key check and copy with no rename table: every
tensor must exist with its shape, and every difference is reported at once, before anything is
loaded. The writer produces the same layout from formula weights (or any tensors), so tests
and the parity command go through the real loading path.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.formula_weights import formula_tensor

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# Buffers computed at construction, never stored in the official checkpoint.
NON_CHECKPOINT_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
DEFAULT_SHARD_BYTES = 5 * 2**30

Shape = tuple[int, ...]


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read (no weights, missing shard, duplicate key)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not match the model's; lists every difference at once."""

    def __init__(
        self,
        missing: Sequence[str],
        unexpected: Sequence[str],
        mismatched: Sequence[tuple[str, Shape, Shape]],
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        lines = [
            f"checkpoint does not match the model: {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} with another shape"
        ]
        lines += [f"  missing: {name}" for name in self.missing]
        lines += [f"  unexpected: {name}" for name in self.unexpected]
        lines += [
            f"  shape: {name} model {list(model)} checkpoint {list(stored)}"
            for name, model, stored in self.mismatched
        ]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    shape: Shape
    stored_name: str  # the name in the file, before any key mapping


def is_checkpoint_key(name: str) -> bool:
    return not name.endswith(NON_CHECKPOINT_SUFFIXES)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when there is one."""
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [file.name for file in files if not file.exists()]
        if absent:
            raise CheckpointError(f"{INDEX_FILE} lists absent shards: {', '.join(absent)}")
        return files
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"no model*.safetensors in {directory}")
    return files


def stored_tensors(
    directory: Path, key_mapping: Callable[[str], str] | None = None
) -> dict[str, StoredTensor]:
    """Model name -> file and shape of every tensor, read from the safetensors headers only.

    `key_mapping` turns a stored name into the model's (None: they are equal, as for the
    official DeepSeek-OCR checkpoint); two stored names mapping to one is an error.
    """
    found: dict[str, StoredTensor] = {}
    duplicates = []
    for file in weight_files(directory):
        with safe_open(file, framework="pt") as handle:
            for stored_name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                name = key_mapping(stored_name) if key_mapping else stored_name
                if name in found:
                    duplicates.append(f"{name} ({found[name].file.name}, {file.name})")
                shape = tuple(handle.get_slice(stored_name).get_shape())
                found[name] = StoredTensor(file, shape, stored_name)
    if duplicates:
        raise CheckpointError("tensors stored twice: " + "; ".join(duplicates))
    return found


def check_tensors(expected: Mapping[str, Shape], stored: Mapping[str, Shape]) -> None:
    """Raise `CheckpointMismatchError` naming every missing, unexpected and mis-shaped key."""
    expected = {name: shape for name, shape in expected.items() if is_checkpoint_key(name)}
    stored = {name: shape for name, shape in stored.items() if is_checkpoint_key(name)}
    missing = sorted(expected.keys() - stored.keys())
    unexpected = sorted(stored.keys() - expected.keys())
    mismatched = sorted(
        (name, tuple(expected[name]), tuple(stored[name]))
        for name in expected.keys() & stored.keys()
        if tuple(expected[name]) != tuple(stored[name])
    )
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched)


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 (the checkpoint's own dtype) on a GPU that has it (compute capability 8+),
    float16 on older GPUs (T4, V100), float32 on CPU."""
    if device.type != "cuda":
        return torch.float32
    return (
        torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    )


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A dtype setting (`auto` or a name in `DTYPES`) for a model on `device`."""
    if name == "auto":
        return default_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@torch.no_grad()
def load_checkpoint(
    model: nn.Module,
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    key_mapping: Callable[[str], str] | None = None,
) -> nn.Module:
    """Load every tensor of `directory` into `model`, strictly, on `device` in `dtype`.

    `model` may live on the meta device: parameters are replaced by the loaded tensors. Its
    buffers that are not in the checkpoint (rotary `inv_freq`) must be real tensors, since
    nothing may stay uninitialised. `key_mapping` renames stored keys to the model's, the one
    place a checkpoint layout that differs from the module names is absorbed. Returns `model`,
    moved to `device`.
    """
    directory, device = Path(directory), torch.device(device)
    dtype = dtype or default_dtype(device)
    stored = stored_tensors(directory, key_mapping)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    check_tensors(expected, {name: entry.shape for name, entry in stored.items()})

    for file in sorted({entry.file for entry in stored.values()}):
        in_file = {name: e.stored_name for name, e in stored.items() if e.file == file}
        with safe_open(file, framework="pt", device=str(device)) as handle:
            shard = {
                name: handle.get_tensor(stored_name).to(dtype)
                for name, stored_name in in_file.items()
                if name in expected
            }
        model.load_state_dict(shard, strict=False, assign=True)
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    uninitialised = [name for name, tensor in tensors if tensor.is_meta]
    if uninitialised:
        raise CheckpointError("left uninitialised (meta): " + ", ".join(uninitialised))
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        exact_float32_on_cuda()
    return model.to(device)


def exact_float32_on_cuda() -> None:
    """A float32 model computes in float32: cuDNN's default TF32 convolutions (SAM's patch
    embedding and neck) keep 10 mantissa bits and moved the parity taps by ~1e-3, beyond the
    float32 tolerances. Process-wide flags, as PyTorch offers them."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def read_manifest(path: str | Path) -> dict[str, Shape]:
    """Name -> shape from a `state_dict_manifest.tsv` (key, shape, dtype, ...; `#` comments)."""
    shapes = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, shape = line.split("\t")[:2]
        shapes[name] = tuple(json.loads(shape))
    return shapes


def save_checkpoint(
    directory: str | Path,
    config: DeepseekOcrConfig | Mapping[str, Any],
    shapes: Mapping[str, Sequence[int]],
    make_tensor: Callable[[str, Shape], torch.Tensor] = formula_tensor,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    write_index: bool = True,
) -> list[Path]:
    """Write a checkpoint directory: `config.json` and `model-*-of-*.safetensors` shards.

    Each tensor is `make_tensor(name, shape)` (the parity formula by default), created shard by
    shard so memory stays near one shard. `config` is written as the official JSON layout.
    Returns the shard paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw_config = config.to_official_dict() if isinstance(config, DeepseekOcrConfig) else config
    (directory / CONFIG_FILE).write_text(json.dumps(raw_config, indent=1), encoding="utf-8")

    item_size = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(
        ((name, tuple(shape)) for name, shape in shapes.items()), item_size, max_shard_bytes
    )
    paths, weight_map = [], {}
    for number, shard in enumerate(shards, start=1):
        path = directory / f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: make_tensor(name, shape).to(dtype).contiguous() for name, shape in shard}
        save_file(tensors, path, metadata={"format": "pt"})
        paths.append(path)
        weight_map |= dict.fromkeys(tensors, path.name)
    if write_index:
        total = sum(math.prod(shape) for shape in shapes.values()) * item_size
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=1), encoding="utf-8")
    return paths


def _plan_shards(
    entries: Iterable[tuple[str, Shape]], item_size: int, max_shard_bytes: int
) -> list[list[tuple[str, Shape]]]:
    """Consecutive groups of tensors, each under `max_shard_bytes` (or one oversized tensor)."""
    shards: list[list[tuple[str, Shape]]] = [[]]
    used = 0
    for name, shape in entries:
        size = math.prod(shape) * item_size
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += size
    return shards


__all__ = [
    "DTYPES",
    "CheckpointError",
    "CheckpointMismatchError",
    "check_tensors",
    "default_dtype",
    "load_checkpoint",
    "read_manifest",
    "resolve_dtype",
    "save_checkpoint",
    "stored_tensors",
]
