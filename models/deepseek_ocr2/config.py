"""DeepSeek-OCR 2 configuration: transformers' `DeepseekOcr2Config`, plus the port's decoder view.

The OCR-2 language model is the DeepSeek-MoE decoder of OCR-1 (MHA with rotate-half RoPE,
float32 softmax router with greedy top-k and no renormalisation, fused shared experts), so our
`TextModel` runs it. `decoder_config` translates transformers' text config into the port's
`DecoderConfig` and refuses, naming the field, whatever that decoder cannot compute the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from transformers import DeepseekOcr2Config, DeepseekOcr2TextConfig

from models.deepseek_ocr.config import ConfigError, DecoderConfig


def _first_dense_layers(mlp_layer_types: list[str] | None, num_layers: int) -> int:
    """`k` of a `["dense"] * k + ["sparse"] * (n - k)` layout, the only one DeepSeek's
    `first_k_dense_replace` (with `moe_layer_freq` 1) expresses."""
    if mlp_layer_types is None or len(mlp_layer_types) != num_layers:
        raise ConfigError(f"mlp_layer_types {mlp_layer_types!r} must name all {num_layers} layers")
    dense = mlp_layer_types.count("dense")
    if list(mlp_layer_types) != ["dense"] * dense + ["sparse"] * (num_layers - dense):
        raise ConfigError(f"mlp_layer_types {mlp_layer_types!r}: dense layers must come first")
    return dense


def decoder_config(text: DeepseekOcr2TextConfig) -> DecoderConfig:
    """The port's `DecoderConfig` for transformers' OCR-2 text config (same computation)."""
    unsupported = {
        "rope_type": (text.rope_parameters["rope_type"], "default"),
        "topk_method": (text.topk_method, "greedy"),
        "hidden_act": (text.hidden_act, "silu"),
        "attention_bias": (text.attention_bias, False),
        "mlp_bias": (text.mlp_bias, False),
        "tie_word_embeddings": (text.tie_word_embeddings, False),
    }
    for name, (value, supported) in unsupported.items():
        if value != supported:
            raise ConfigError(f"text_config {name} {value!r} is not supported, only {supported!r}")
    return DecoderConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=text.hidden_size // text.num_attention_heads,  # what transformers uses
        intermediate_size=text.intermediate_size,
        moe_intermediate_size=text.moe_intermediate_size,
        n_routed_experts=text.n_routed_experts,
        num_experts_per_tok=text.num_experts_per_tok,
        n_shared_experts=text.n_shared_experts,
        first_k_dense_replace=_first_dense_layers(text.mlp_layer_types, text.num_hidden_layers),
        moe_layer_freq=1,
        norm_topk_prob=False,  # transformers' OCR-2 router never renormalises
        routed_scaling_factor=text.routed_scaling_factor,
        rms_norm_eps=text.rms_norm_eps,
        rope_theta=text.rope_parameters["rope_theta"],
        max_position_embeddings=text.max_position_embeddings,
        bos_token_id=0 if text.bos_token_id is None else text.bos_token_id,
        eos_token_id=1 if text.eos_token_id is None else text.eos_token_id,
    )


@dataclass(frozen=True)
class DeepseekOcr2PortConfig:
    """transformers' config of the checkpoint, and the decoder sizes that the port's batched
    generator reads (`config.decoder`, as for OCR-1)."""

    transformers_config: DeepseekOcr2Config
    decoder: DecoderConfig

    @classmethod
    def from_transformers(cls, config: DeepseekOcr2Config) -> DeepseekOcr2PortConfig:
        return cls(config, decoder_config(config.text_config))

    @property
    def image_token_id(self) -> int:
        return self.transformers_config.image_token_id


def text_config_sizes(decoder: DecoderConfig) -> dict[str, Any]:
    """transformers' text config for the port's decoder sizes (the inverse of
    `decoder_config`): OCR-2 keeps OCR-1's DeepSeek-3B-MoE decoder unchanged."""
    sizes = asdict(decoder)
    dense = decoder.first_k_dense_replace
    return {
        **{
            name: sizes[name]
            for name in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "n_routed_experts",
                "num_experts_per_tok",
                "n_shared_experts",
                "moe_intermediate_size",
                "routed_scaling_factor",
                "rms_norm_eps",
                "max_position_embeddings",
                "bos_token_id",
                "eos_token_id",
            )
        },
        "mlp_layer_types": ["dense"] * dense + ["sparse"] * (decoder.num_hidden_layers - dense),
        "rope_parameters": {"rope_type": "default", "rope_theta": decoder.rope_theta},
        "pad_token_id": 2,
    }


def official_config() -> DeepseekOcr2Config:
    """DeepSeek-OCR 2's published sizes (transformers' defaults are other models'): SAM-B with
    an 896-channel neck, a Qwen2-0.5B-style encoder (24 layers, 896 wide, 14 heads, 2 KV heads,
    FFN 4864, RoPE theta 1e6) and OCR-1's decoder."""
    return DeepseekOcr2Config(
        vision_config={
            "sam_config": {"downsample_channels": [512, 896]},
            "encoder_config": {
                "hidden_size": 896,
                "intermediate_size": 4864,
                "num_hidden_layers": 24,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
            },
        },
        text_config=text_config_sizes(DecoderConfig()),
    )


def tiny_config() -> DeepseekOcr2Config:
    """A few-MB random model with the real views (1024/768 px, so the real query banks and
    placeholder counts) and the real vocabulary, narrow and shallow everywhere else."""
    decoder = DecoderConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=32,
        max_position_embeddings=4096,
    )
    return DeepseekOcr2Config(
        vision_config={
            "sam_config": {
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "output_channels": 16,
                "global_attn_indexes": [1],
                "downsample_channels": [24, 48],
            },
            "encoder_config": {
                "hidden_size": 48,
                "intermediate_size": 96,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
            },
        },
        text_config={
            **text_config_sizes(decoder),
            "initializer_range": 0.2,  # distinct logits, so greedy ties are not a coin toss
        },
    )


__all__ = [
    "DeepseekOcr2PortConfig",
    "decoder_config",
    "official_config",
    "text_config_sizes",
    "tiny_config",
]
