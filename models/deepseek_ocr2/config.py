"""DeepSeek-OCR 2 configuration: transformers' `DeepseekOcr2Config`, plus the port's decoder view.

The OCR-2 language model is the DeepSeek-MoE decoder of OCR-1 (MHA with rotate-half RoPE,
float32 softmax router with greedy top-k and no renormalisation, fused shared experts), so our
`TextModel` runs it. `decoder_config` translates transformers' text config into the port's
`DecoderConfig` and refuses, naming the field, whatever that decoder cannot compute the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

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


__all__ = ["DeepseekOcr2PortConfig", "decoder_config"]
