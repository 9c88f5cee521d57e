"""Parsing the official `config.json` (model_type deepseek_vl_v2) and the parity set's config."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from models.deepseek_ocr.config import ConfigError, DeepseekOcrConfig
from tests.conftest import REFERENCE_DIR

OFFICIAL_JSON = REFERENCE_DIR / "deepseek-ocr" / "config.json"


@pytest.fixture
def official() -> dict:
    return json.loads(OFFICIAL_JSON.read_text())


def test_official_config_gives_the_published_architecture(official):
    config = DeepseekOcrConfig.from_official_json(official)
    assert config == DeepseekOcrConfig()  # the defaults are the official model
    decoder = config.decoder
    assert (decoder.vocab_size, decoder.hidden_size, decoder.head_dim) == (129280, 1280, 128)
    assert decoder.mlp_layer_types == ("dense",) + ("moe",) * 11
    assert decoder.shared_expert_intermediate_size == 1792
    assert config.sam.global_attn_indexes == (2, 5, 8, 11)
    assert config.sam.downsample_channels == (512, 1024)
    assert (config.clip.num_layers, config.clip.num_positions) == (24, 257)
    assert [config.tokens_per_side(side) for side in (512, 640, 1024, 1280)] == [8, 10, 16, 20]


def test_parity_config_keeps_the_encoder_and_shrinks_the_decoder():
    config = DeepseekOcrConfig.from_official_json(REFERENCE_DIR / "parity")
    assert (config.sam, config.clip) == (DeepseekOcrConfig().sam, DeepseekOcrConfig().clip)
    decoder = config.decoder
    assert (decoder.num_hidden_layers, decoder.vocab_size, decoder.n_routed_experts) == (2, 4096, 8)
    assert (decoder.intermediate_size, decoder.moe_intermediate_size) == (512, 128)
    assert decoder.mlp_layer_types == ("dense", "moe")
    assert config.dtype == torch.float32


def test_mla_is_refused(official):
    official["language_config"]["use_mla"] = True
    with pytest.raises(ConfigError, match="use_mla"):
        DeepseekOcrConfig.from_official_json(official)


def test_disagreeing_decoder_sections_are_refused(official):
    official["language_config"]["num_hidden_layers"] = 6
    with pytest.raises(ConfigError, match="num_hidden_layers: 12 vs 6"):
        DeepseekOcrConfig.from_official_json(official)


def test_other_model_types_are_refused(official):
    official["model_type"] = "deepseek_v2"
    with pytest.raises(ConfigError, match="model_type"):
        DeepseekOcrConfig.from_official_json(official)


def test_language_config_alone_is_enough(official):
    stripped = {k: v for k, v in official.items() if k not in official["language_config"]}
    stripped["model_type"] = official["model_type"]
    assert DeepseekOcrConfig.from_official_json(stripped) == DeepseekOcrConfig()


def test_tiny_config_round_trips_through_the_official_layout():
    tiny = DeepseekOcrConfig.tiny()
    raw = copy.deepcopy(tiny.to_official_dict())
    assert DeepseekOcrConfig.from_official_json(raw) == tiny
    assert tiny.sam.downsample_factor == 64  # the processor's real view sizes still apply


def test_inconsistent_widths_are_refused(official):
    official["projector_config"]["n_embed"] = 1024
    with pytest.raises(ConfigError, match="n_embed 1024"):
        DeepseekOcrConfig.from_official_json(official)
