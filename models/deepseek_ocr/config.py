"""Typed configuration of the DeepSeek-OCR port.

The official `config.json` has `model_type: deepseek_vl_v2`, which transformers does not know, so
`from_official_json` parses it here, in one place, and turns its quirks into explicit fields:

* the decoder keys appear twice (top level, read by the HF remote code, and `language_config`,
  read by vLLM); we read the top level and refuse a file where the two disagree;
* MLA leftovers (`kv_lora_rank`, `qk_rope_head_dim`, `v_head_dim`, ...) are ignored, and
  `use_mla: true` is refused because the checkpoint has plain q/k/v/o attention;
* the official code hard-codes the encoder sizes and `vision_config` holds only some of them
  (its `mlp_ratio` is a SigLIP leftover). We read the ones that agree with the hard-coded
  architecture and take the rest from defaults equal to it. `to_official_dict` writes the other
  sizes as extra keys (`patch_size`, `window_size`, `mlp_dim`, ...) so a small test model
  round-trips through a `config.json` too.

`DeepseekOcrConfig` is a transformers `PreTrainedConfig` with the official `model_type`:
`from_pretrained` and `save_pretrained` read and write exactly this layout, and
`AutoConfig` does once `modeling.register_auto_classes()` has run; no remote code is involved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Self

import torch
import transformers
from transformers import PreTrainedConfig

OFFICIAL_MODEL_TYPE = "deepseek_vl_v2"
IMAGE_TOKEN_ID = 128815  # `<image>`, hard-coded in the official inference
SAM_WIDTH_KEY = "sam_vit_b"
CLIP_WIDTH_KEY = "clip-l-14-224"


class ConfigError(ValueError):
    """A config.json that this port cannot build a model from."""


@dataclass(frozen=True)
class SamConfig:
    """SAM ViT-B image encoder, its neck and the 16x token compressor (`net_2`, `net_3`)."""

    image_size: int = 1024  # the position table covers image_size // patch_size squared
    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    neck_channels: int = 256
    downsample_channels: tuple[int, ...] = (512, 1024)  # one stride-2 conv each
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if len(self.downsample_channels) != 2:
            raise ConfigError(
                f"downsample_channels {self.downsample_channels}: the checkpoint has exactly "
                "two compressor convs (net_2, net_3)"
            )

    @property
    def grid_size(self) -> int:
        """Side of the stored position-embedding grid (64 for the official model)."""
        return self.image_size // self.patch_size

    @property
    def output_channels(self) -> int:
        return self.downsample_channels[-1]

    @property
    def downsample_factor(self) -> int:
        """Pixels per output token along one side: patch size times 2 per stride-2 conv (64)."""
        return self.patch_size * 2 ** len(self.downsample_channels)


@dataclass(frozen=True)
class ClipConfig:
    """CLIP-L/14 encoder that takes SAM features as its patch embeddings."""

    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    layer_norm_eps: float = 1e-5

    @property
    def grid_size(self) -> int:
        """Side of the stored position grid without the class token (16)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + 1


@dataclass(frozen=True)
class DecoderConfig:
    """DeepSeek-MoE decoder (DeepSeek-V2 family without MLA)."""

    vocab_size: int = 129280
    hidden_size: int = 1280
    num_hidden_layers: int = 12
    num_attention_heads: int = 10
    num_key_value_heads: int = 10
    head_dim: int = 128
    intermediate_size: int = 6848
    moe_intermediate_size: int = 896
    n_routed_experts: int = 64
    num_experts_per_tok: int = 6
    n_shared_experts: int = 2
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    bos_token_id: int = 0
    eos_token_id: int = 1
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        if self.topk_method != "greedy":
            raise ConfigError(f"topk_method {self.topk_method!r} is not supported, only 'greedy'")
        if self.scoring_func != "softmax":
            raise ConfigError(f"scoring_func {self.scoring_func!r} is not supported")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @property
    def mlp_layer_types(self) -> tuple[str, ...]:
        """`"dense"` or `"moe"` per layer, the DeepSeek-V2 rule made explicit."""
        return tuple(
            "moe"
            if self.n_routed_experts > 0
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
            else "dense"
            for i in range(self.num_hidden_layers)
        )

    @property
    def shared_expert_intermediate_size(self) -> int:
        """The shared experts run as one MLP this wide (2 x 896 = 1792)."""
        return self.moe_intermediate_size * self.n_shared_experts


class DeepseekOcrConfig(PreTrainedConfig):
    """The whole model: DeepEncoder (SAM + CLIP), projector, layout vectors, decoder.

    A transformers config whose JSON form is the official layout: `from_dict` (and so
    `from_pretrained`, `AutoConfig`) parses through `from_official_json`, and `to_dict` writes
    `to_official_dict`, so a saved folder reads like the official one. The parts stay typed
    dataclasses (`sam`, `clip`, `decoder`) because the rest of the port reads them. `dtype` is
    the checkpoint's (`torch_dtype` in the file).
    """

    model_type = OFFICIAL_MODEL_TYPE

    sam: SamConfig = field(default_factory=SamConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    projector_input_dim: int = 2048  # CLIP features, then SAM features
    projector_output_dim: int = 1280  # = decoder hidden size
    image_token_id: int = IMAGE_TOKEN_ID
    tile_tag: str = "2D"
    dtype: str | torch.dtype | None = "bfloat16"

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.sam.output_channels != self.clip.hidden_size:
            raise ConfigError(
                f"SAM output channels {self.sam.output_channels} must equal the CLIP hidden "
                f"size {self.clip.hidden_size}: SAM features are CLIP's patch embeddings"
            )
        fused = self.clip.hidden_size + self.sam.output_channels
        if self.projector_input_dim != fused:
            raise ConfigError(
                f"projector input_dim {self.projector_input_dim} != CLIP + SAM channels {fused}"
            )
        if self.projector_output_dim != self.decoder.hidden_size:
            raise ConfigError(
                f"projector n_embed {self.projector_output_dim} != decoder hidden_size "
                f"{self.decoder.hidden_size}"
            )
        if self.tile_tag != "2D":
            raise ConfigError(f"tile_tag {self.tile_tag!r} is not supported, only '2D'")

    def __eq__(self, other: object) -> bool:
        """Equal when they describe the same model and checkpoint dtype; transformers'
        bookkeeping (`architectures`, `name_or_path`, ...) does not count."""
        if not isinstance(other, DeepseekOcrConfig):
            return NotImplemented
        return self.to_official_dict() == other.to_official_dict()

    # transformers reads these sizes at the top level (generation, weight tying, validation).
    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.decoder.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.decoder.num_hidden_layers

    @property
    def num_attention_heads(self) -> int:
        return self.decoder.num_attention_heads

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> Self:
        """This config itself: its `decoder` is a plain dataclass, not a transformers text config
        (the base class would return it because of its name)."""
        return self

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Self | tuple[Self, dict]:
        """The official layout, parsed by `from_official_json`; what `from_pretrained` calls.

        Loader options that transformers passes along (`return_unused_kwargs`, `name_or_path`,
        attention settings) are honoured or handed back; other keys are refused, since they
        would silently not apply.
        """
        return_unused = kwargs.pop("return_unused_kwargs", False)
        config = cls.from_official_json(config_dict)
        config.name_or_path = kwargs.pop("name_or_path", "")
        for name in ("attn_implementation", "experts_implementation"):
            kwargs.pop(name, None)  # the port has one implementation of each
        if return_unused:
            return config, kwargs
        if kwargs:
            raise ConfigError(f"unknown config options: {', '.join(sorted(kwargs))}")
        return config

    def to_dict(self) -> dict[str, Any]:
        return self.to_official_dict() | {"transformers_version": transformers.__version__}

    def to_diff_dict(self) -> dict[str, Any]:
        """The whole official layout: a checkpoint's `config.json` names every size."""
        return self.to_dict()

    def tokens_per_side(self, view_size: int) -> int:
        """Vision tokens along one side of a square view of `view_size` pixels (1024 -> 16)."""
        return -(-view_size // self.sam.downsample_factor)

    @classmethod
    def from_official_json(cls, source: str | Path | dict[str, Any]) -> DeepseekOcrConfig:
        """Parse an official-format `config.json` (a path, a checkpoint directory or its dict)."""
        raw = _read_json(source)
        model_type = raw.get("model_type")
        if model_type != OFFICIAL_MODEL_TYPE:
            raise ConfigError(f"model_type {model_type!r}, expected {OFFICIAL_MODEL_TYPE!r}")
        projector = raw.get("projector_config", {})
        if projector.get("projector_type", "linear") != "linear":
            raise ConfigError(f"projector_type {projector['projector_type']!r} is not supported")
        decoder = _parse_decoder(raw)
        return cls(
            sam=_parse_sam(raw.get("vision_config", {})),
            clip=_parse_clip(raw.get("vision_config", {})),
            decoder=decoder,
            projector_input_dim=projector.get("input_dim", 2048),
            projector_output_dim=projector.get("n_embed", decoder.hidden_size),
            image_token_id=raw.get("image_token_id", IMAGE_TOKEN_ID),
            tile_tag=raw.get("tile_tag", "2D"),
            dtype=raw.get("torch_dtype", "bfloat16"),
        )

    def to_official_dict(self) -> dict[str, Any]:
        """The official layout again; `from_official_json(to_official_dict())` == self."""
        sam, clip = self.sam, self.clip
        decoder = {f.name: getattr(self.decoder, f.name) for f in fields(self.decoder)}
        decoder |= {"use_mla": False, "kv_lora_rank": None, "q_lora_rank": None}
        return {
            "model_type": OFFICIAL_MODEL_TYPE,
            "architectures": ["DeepseekOCRForCausalLM"],
            "image_token_id": self.image_token_id,  # not in the official file (hard-coded there)
            "tile_tag": self.tile_tag,
            "torch_dtype": str(self.dtype).removeprefix("torch."),
            "projector_config": {
                "projector_type": "linear",
                "model_type": "mlp_projector",
                "input_dim": self.projector_input_dim,
                "n_embed": self.projector_output_dim,
            },
            "vision_config": {
                "image_size": sam.image_size,
                "model_name": "deeplip_b_l",
                "model_type": "vision",
                "width": {
                    CLIP_WIDTH_KEY: {
                        "heads": clip.num_heads,
                        "image_size": clip.image_size,
                        "layers": clip.num_layers,
                        "patch_size": clip.patch_size,
                        "width": clip.hidden_size,
                        "intermediate_size": clip.intermediate_size,
                        "layer_norm_eps": clip.layer_norm_eps,
                    },
                    SAM_WIDTH_KEY: {
                        "downsample_channels": list(sam.downsample_channels),
                        "global_attn_indexes": list(sam.global_attn_indexes),
                        "heads": sam.num_heads,
                        "layers": sam.num_layers,
                        "width": sam.hidden_size,
                        "patch_size": sam.patch_size,
                        "window_size": sam.window_size,
                        "mlp_dim": sam.mlp_dim,
                        "neck_channels": sam.neck_channels,
                        "layer_norm_eps": sam.layer_norm_eps,
                    },
                },
            },
            "language_config": dict(decoder),
            **decoder,
        }

    @classmethod
    def tiny(cls, vocab_size: int = 129280) -> DeepseekOcrConfig:
        """A small model with every structural feature of the real one, for CPU tests.

        Patch size and compression stay 16 and 64, so the processor's real view sizes work;
        a 128-px view gives 2x2 tokens, 192 px 3x3 (both resize the position tables and pad
        the windows). The default vocabulary is the real one so real prompts embed.
        """
        return cls(
            sam=SamConfig(
                image_size=256,
                hidden_size=32,
                num_layers=2,
                num_heads=2,
                mlp_dim=64,
                window_size=5,
                global_attn_indexes=(1,),
                neck_channels=16,
                downsample_channels=(24, 32),
            ),
            clip=ClipConfig(
                image_size=56,
                hidden_size=32,
                num_layers=2,
                num_heads=2,
                intermediate_size=64,
            ),
            decoder=DecoderConfig(
                vocab_size=vocab_size,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                head_dim=16,
                intermediate_size=128,
                moe_intermediate_size=32,
                n_routed_experts=4,
                num_experts_per_tok=2,
                n_shared_experts=1,
                max_position_embeddings=4096,
            ),
            projector_input_dim=64,
            projector_output_dim=64,
            dtype="float32",
        )


def _read_json(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _parse_sam(vision: dict[str, Any]) -> SamConfig:
    width = vision.get("width", {}).get(SAM_WIDTH_KEY, {})
    default = SamConfig()
    return SamConfig(
        image_size=vision.get("image_size", default.image_size),
        patch_size=width.get("patch_size", default.patch_size),
        hidden_size=width.get("width", default.hidden_size),
        num_layers=width.get("layers", default.num_layers),
        num_heads=width.get("heads", default.num_heads),
        mlp_dim=width.get("mlp_dim", default.mlp_dim),
        window_size=width.get("window_size", default.window_size),
        global_attn_indexes=tuple(width.get("global_attn_indexes", default.global_attn_indexes)),
        neck_channels=width.get("neck_channels", default.neck_channels),
        downsample_channels=tuple(width.get("downsample_channels", default.downsample_channels)),
        layer_norm_eps=width.get("layer_norm_eps", default.layer_norm_eps),
    )


def _parse_clip(vision: dict[str, Any]) -> ClipConfig:
    width = vision.get("width", {}).get(CLIP_WIDTH_KEY, {})
    default = ClipConfig()
    return ClipConfig(
        image_size=width.get("image_size", default.image_size),
        patch_size=width.get("patch_size", default.patch_size),
        hidden_size=width.get("width", default.hidden_size),
        num_layers=width.get("layers", default.num_layers),
        num_heads=width.get("heads", default.num_heads),
        intermediate_size=width.get("intermediate_size", default.intermediate_size),
        layer_norm_eps=width.get("layer_norm_eps", default.layer_norm_eps),
    )


def _parse_decoder(raw: dict[str, Any]) -> DecoderConfig:
    """Decoder fields from the top level (what the HF remote code reads), checked against
    `language_config` (what vLLM reads); defaults are those of DeepSeek-V2's config class."""
    for section_name, section in (
        ("top level", raw),
        ("language_config", raw.get("language_config", {})),
    ):
        if section.get("use_mla", False):
            raise ConfigError(f"use_mla is true in {section_name}; this port has no MLA attention")
        if section.get("rope_scaling") is not None:
            raise ConfigError(f"rope_scaling in {section_name} is not supported")
        if section.get("attention_bias", False):
            raise ConfigError(f"attention_bias in {section_name} is not supported")
    names = [f.name for f in fields(DecoderConfig)]
    present = {name: raw[name] for name in names if name in raw}
    language = raw.get("language_config", {})
    disagree = [
        f"{name}: {present[name]!r} vs {language[name]!r}"
        for name in names
        if name in present and name in language and present[name] != language[name]
    ]
    if disagree:
        raise ConfigError(
            "top-level and language_config decoder keys differ: " + "; ".join(disagree)
        )
    values = {name: language[name] for name in names if name in language} | present
    if "head_dim" not in values and "hidden_size" in values:
        heads = values.get("num_attention_heads", DecoderConfig.num_attention_heads)
        values["head_dim"] = values["hidden_size"] // heads
    if values.get("n_shared_experts") is None:
        values["n_shared_experts"] = 0
    if values.get("n_routed_experts") is None:
        values["n_routed_experts"] = 0
    return DecoderConfig(**values)


__all__ = ["ClipConfig", "ConfigError", "DecoderConfig", "DeepseekOcrConfig", "SamConfig"]
