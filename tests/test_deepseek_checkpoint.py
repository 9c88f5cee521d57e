"""Strict checkpoint loading: the full-size architecture against the official manifest, and a
round trip through a written checkpoint directory (sharded, with and without an index)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.deepseek_ocr.checkpoint import (
    INDEX_FILE,
    CheckpointError,
    CheckpointMismatchError,
    check_tensors,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.formula_weights import formula_tensor
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM
from models.deepseek_ocr.vision import DeepEncoder
from tests.conftest import REFERENCE_DIR

OFFICIAL_DIR = REFERENCE_DIR / "deepseek-ocr"
PARITY_DIR = REFERENCE_DIR / "parity"
VISION_PREFIXES = (
    "model.sam_model.",
    "model.vision_model.",
    "model.projector.",
    "model.image_newline",
    "model.view_seperator",
)


def _meta_shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + name: tuple(t.shape) for name, t in module.state_dict().items()}


def test_full_size_model_matches_all_2710_official_tensors():
    manifest = read_manifest(OFFICIAL_DIR / "state_dict_manifest.tsv")
    config = DeepseekOcrConfig.from_official_json(OFFICIAL_DIR)
    with torch.device("meta"):
        model = DeepseekOcrForCausalLM(config)
    shapes = _meta_shapes(model)
    check_tensors(shapes, manifest)  # raises, naming every difference
    assert len(shapes) == len(manifest) == 2710
    assert sum(p.numel() for p in model.parameters()) == 3_336_106_240


def test_vision_part_matches_official_manifest():
    manifest = read_manifest(OFFICIAL_DIR / "state_dict_manifest.tsv")
    vision_manifest = {k: v for k, v in manifest.items() if k.startswith(VISION_PREFIXES)}
    with torch.device("meta"):
        encoder = DeepEncoder(DeepseekOcrConfig())
    check_tensors(_meta_shapes(encoder, "model."), vision_manifest)
    assert len(vision_manifest) == 179 + 293 + 4


def test_parity_model_matches_parity_manifest():
    with torch.device("meta"):
        model = DeepseekOcrForCausalLM(DeepseekOcrConfig.from_official_json(PARITY_DIR))
    check_tensors(_meta_shapes(model), read_manifest(PARITY_DIR / "state_dict_manifest.tsv"))


@pytest.fixture
def tiny_config() -> DeepseekOcrConfig:
    return DeepseekOcrConfig.tiny(vocab_size=512)


@pytest.fixture
def tiny_shapes(tiny_config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return _meta_shapes(DeepseekOcrForCausalLM(tiny_config))


def _load_fresh(config: DeepseekOcrConfig, directory: Path, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        model = DeepseekOcrForCausalLM(config)
    return load_checkpoint(model, directory, **kwargs)


def test_round_trip_sharded_checkpoint_loads_every_tensor(tmp_path, tiny_config, tiny_shapes):
    shards = save_checkpoint(tmp_path, tiny_config, tiny_shapes, max_shard_bytes=200_000)
    assert len(shards) >= 3
    assert DeepseekOcrConfig.from_official_json(tmp_path) == tiny_config

    model = _load_fresh(tiny_config, tmp_path)
    state = model.state_dict()
    assert state.keys() == tiny_shapes.keys()
    for name, tensor in state.items():
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32
        assert torch.equal(tensor, formula_tensor(name, tiny_shapes[name])), name

    # The same shards without the index are found by their file names.
    (tmp_path / INDEX_FILE).unlink()
    model = _load_fresh(tiny_config, tmp_path, dtype=torch.bfloat16)
    weight = model.model.projector.layers.weight
    assert weight.dtype == torch.bfloat16
    expected = formula_tensor("model.projector.layers.weight", weight.shape)
    assert torch.equal(weight, expected.to(torch.bfloat16))


def test_corrupted_checkpoint_names_every_problem(tmp_path, tiny_config, tiny_shapes):
    shapes = dict(tiny_shapes)
    del shapes["model.view_seperator"]
    shapes["model.layers.0.self_attn.q_proj.weight"] = (64, 32)
    shapes["model.extra_tensor"] = (3,)
    save_checkpoint(tmp_path, tiny_config, shapes)

    with pytest.raises(CheckpointMismatchError) as caught:
        _load_fresh(tiny_config, tmp_path)
    error = caught.value
    assert error.missing == ["model.view_seperator"]
    assert error.unexpected == ["model.extra_tensor"]
    assert error.mismatched == [("model.layers.0.self_attn.q_proj.weight", (64, 64), (64, 32))]
    message = str(error)
    for name in ("model.view_seperator", "model.extra_tensor", "q_proj.weight"):
        assert name in message


def test_index_naming_an_absent_shard_is_an_error(tmp_path, tiny_config, tiny_shapes):
    save_checkpoint(tmp_path, tiny_config, tiny_shapes, max_shard_bytes=200_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    missing_shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / missing_shard).unlink()
    with pytest.raises(CheckpointError, match=missing_shard):
        _load_fresh(tiny_config, tmp_path)


def test_directory_without_weights_is_an_error(tmp_path, tiny_config):
    with pytest.raises(CheckpointError, match="no model"):
        _load_fresh(tiny_config, tmp_path)
