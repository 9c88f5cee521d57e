"""DeepSeek-OCR: the DeepEncoder and the DeepSeek-MoE decoder tied together under checkpoint names.

The checkpoint keeps vision and decoder weights side by side under `model.` (`model.sam_model`,
`model.vision_model`, `model.projector`, `model.image_newline`, `model.view_seperator`,
`model.embed_tokens`, `model.layers`, `model.norm`) plus an untied `lm_head`, so
`DeepseekOcrModel` is both the vision encoder and the text model, and the official state dict
loads 1:1.

A page's vision span replaces the embeddings at its `<image>` placeholders; the counts must match
exactly (the official code's `masked_scatter_` would silently misplace features otherwise).

`DeepseekOcrForCausalLM` is a transformers `PreTrainedModel`: `from_pretrained` reads an official
checkpoint folder through the strict loader (`checkpoint.load_checkpoint`) and `save_pretrained`
writes one back. Its forward keeps the port's signature (vision spans, cache steps) because our
batched generator drives it; it does not use transformers' `generate`.

Legend: B pages (rows), T tokens per row, C hidden size, V vocabulary, N placeholders of a page.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from huggingface_hub import snapshot_download
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from models.deepseek_ocr.checkpoint import load_checkpoint, resolve_dtype
from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.decode_attention import DecodeAttention
from models.deepseek_ocr.decoder import TextAttention, TextExperts, TextModel
from models.deepseek_ocr.expert_kernels import ExpertKernel
from models.deepseek_ocr.kv_cache import CacheStep
from models.deepseek_ocr.vision import DeepEncoder


class VisionSpanMismatch(ValueError):
    """A page's `<image>` placeholders and its vision features differ in number."""


def scatter_vision_spans(
    embeds: torch.Tensor,
    images_seq_mask: torch.Tensor | None,
    vision_spans: Sequence[torch.Tensor | None] | None,
) -> torch.Tensor:
    """Write each row's vision span into token embeddings `(B, T, C)` at its placeholders.

    `images_seq_mask` is `(B, T)` bool; `vision_spans[b]` is `(N_b, C)`, or None for a row
    without an image. Raises `VisionSpanMismatch` naming both numbers when they differ.
    """
    if images_seq_mask is None or vision_spans is None:
        return embeds
    if len(vision_spans) != len(embeds):
        raise VisionSpanMismatch(
            f"{len(embeds)} rows of input ids but {len(vision_spans)} vision spans"
        )
    placeholders = images_seq_mask.sum(dim=1).tolist()
    spans = []
    for row, (count, span) in enumerate(zip(placeholders, vision_spans, strict=True)):
        features = 0 if span is None else len(span)
        if count != features:
            raise VisionSpanMismatch(
                f"row {row}: image placeholders {count}, vision features {features}"
            )
        if span is not None:
            spans.append(span)
    if spans:
        # Row-major boolean indexing visits rows in order, each row's positions in order.
        embeds[images_seq_mask] = torch.cat(spans).to(embeds.dtype)
    return embeds


class DeepseekOcrModel(TextModel, DeepEncoder):
    """Vision encoder and text decoder in one module, as the checkpoint's `model.` prefix has it."""

    def __init__(self, config: DeepseekOcrConfig) -> None:
        DeepEncoder.__init__(self, config)  # nn.Module set-up and the vision submodules
        self.init_decoder(config.decoder)

    def embed_with_images(
        self,
        input_ids: torch.Tensor,
        images_seq_mask: torch.Tensor | None = None,
        vision_spans: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Token embeddings `(B, T, C)` with each row's vision span written at its placeholders
        (`scatter_vision_spans`)."""
        return scatter_vision_spans(self.embed_tokens(input_ids), images_seq_mask, vision_spans)


# Files of a checkpoint folder that loading reads (a Hub download fetches only these, no code).
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors"]
# Options that Auto classes and the Hub pass along; meaningless for a local folder.
HUB_OPTIONS = {"cache_dir", "force_download", "local_files_only", "proxies", "revision", "token"}


def checkpoint_directory(
    name_or_path: str | os.PathLike[str], options: dict[str, Any], subfolder: str = ""
) -> Path:
    """A local folder as it is; a Hub id downloaded first (configs, tokenizer and weights).
    `subfolder` names the checkpoint's folder inside either (newer Auto classes always pass it)."""
    directory = Path(name_or_path)
    if directory.is_dir():
        return directory / subfolder
    options = {name: value for name, value in options.items() if value is not None}
    patterns = [
        f"{subfolder}/{pattern}" if subfolder else pattern for pattern in CHECKPOINT_PATTERNS
    ]
    return (
        Path(snapshot_download(str(name_or_path), **options, allow_patterns=patterns)) / subfolder
    )


def hub_options(options: dict[str, Any]) -> dict[str, Any]:
    """The Hub options among `from_pretrained`'s extra keywords; refuses the rest that are set,
    by name, since an ignored option (remote code, adapters, quantisation, ...) would fail
    silently. Options left unset (None, False, empty) are what newer Auto classes pass along
    by default, and mean nothing here."""
    if options.pop("trust_remote_code", False):
        raise ValueError("this port never runs a checkpoint's remote code")
    if "_adapter_model_path" in (options.pop("adapter_kwargs", None) or {}):
        raise ValueError("PEFT adapters are not supported by this port")
    hub = {name: options.pop(name) for name in HUB_OPTIONS & options.keys()}
    unknown = sorted(
        name
        for name, value in options.items()
        if not name.startswith("_") and not _unset(value)  # `_from_auto`
    )
    if unknown:
        raise TypeError(f"unsupported from_pretrained options: {', '.join(unknown)}")
    return hub


def _unset(value: Any) -> bool:
    return (
        value is None
        or value is False
        or (isinstance(value, str | dict | list | tuple) and not value)
    )


def vision_language_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    images_seq_mask: torch.Tensor | None,
    vision_spans: Sequence[torch.Tensor | None] | None,
    cache_step: CacheStep | None,
    logits_index: torch.Tensor | None,
    float_logits: bool = True,
) -> torch.Tensor:
    """The forward both generations share: vision spans scattered into the embeddings, the
    decoder, then `lm_head` in float32 (`model.model`, `model.lm_head`).

    Picking the positions before `lm_head` keeps a large prefill from materialising
    B x T x V logits when only each prompt's last position is needed. Greedy decoding that
    keeps no logits passes `float_logits=False`: the upcast is exact, so the argmax is the same,
    and skipping it saves a decode step three passes over `(B, V)` float32 logits.
    """
    embeds = model.model.embed_with_images(input_ids, images_seq_mask, vision_spans)
    hidden_states = model.model(embeds, cache_step=cache_step)  # (B, T, C)
    if logits_index is not None:
        rows = torch.arange(len(hidden_states), device=hidden_states.device)
        hidden_states = hidden_states[rows, logits_index]  # (B, C)
    logits = model.lm_head(hidden_states)
    return logits.float() if float_logits else logits


class DeepseekOcrPreTrainedModel(PreTrainedModel):
    config_class = DeepseekOcrConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = [
        "TextDecoderLayer",
        "SamVisionLayer",
        "ClipEncoderLayer",
    ]

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: modules keep PyTorch's initialisation from construction (what the tests and
        random-weight benchmarks use), and a checkpoint overwrites every tensor anyway."""


class DeepseekOcrForCausalLM(DeepseekOcrPreTrainedModel):
    """The whole model: `model` (vision + decoder) and the untied `lm_head`."""

    def __init__(self, config: DeepseekOcrConfig) -> None:
        super().__init__(config)
        self.model = DeepseekOcrModel(config)
        self.lm_head = nn.Linear(config.decoder.hidden_size, config.decoder.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        config: DeepseekOcrConfig | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> Self:
        """Load a checkpoint folder (official layout, or one `save_pretrained` wrote) strictly.

        Every tensor of the folder must be a tensor of the model with its shape and none may be
        missing (`CheckpointMismatchError` lists every difference). `dtype` None means bfloat16
        on GPUs that have it, float16 on older ones, float32 on CPU; `"auto"` the checkpoint's
        own; or a name or `torch.dtype`. `device_map` may name one device. A Hub id is
        downloaded first (no remote code, ever).
        """
        dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
        device = torch.device(kwargs.pop("device_map", None) or device)  # one device only
        subfolder = kwargs.pop("subfolder", None) or ""
        directory = checkpoint_directory(
            pretrained_model_name_or_path, hub_options(kwargs), subfolder
        )
        config = config or DeepseekOcrConfig.from_pretrained(directory)
        if dtype == "auto":
            dtype = config.dtype
        elif isinstance(dtype, str):
            dtype = resolve_dtype(dtype, device)
        with torch.device("meta"):
            model = cls(config)
        load_checkpoint(model, directory, device=device, dtype=dtype)
        model.name_or_path = str(pretrained_model_name_or_path)
        return model.eval()

    def forward(
        self,
        input_ids: torch.Tensor,
        images_seq_mask: torch.Tensor | None = None,
        vision_spans: Sequence[torch.Tensor | None] | None = None,
        cache_step: CacheStep | None = None,
        logits_index: torch.Tensor | None = None,
        *,
        float_logits: bool = True,
    ) -> torch.Tensor:
        """Logits for `(B, T)` ids: `(B, T, V)`, or `(B, V)` at `logits_index` `(B,)`; float32
        unless `float_logits` is off (`vision_language_logits`)."""
        return vision_language_logits(
            self, input_ids, images_seq_mask, vision_spans, cache_step, logits_index, float_logits
        )

    def set_expert_kernel(self, kernel: ExpertKernel | str) -> None:
        """Force the MoE experts' matmul path (`expert_kernels`; `auto` chooses per call)."""
        for module in self.modules():
            if isinstance(module, TextExperts):
                module.kernel = ExpertKernel(kernel)

    def set_decode_attention(self, path: DecodeAttention | str | None) -> None:
        """Force the decode step's attention path (`decode_attention`; `auto` chooses per call,
        None leaves it to the OCRFLOW_DECODE_ATTENTION variable, as a model is built)."""
        for module in self.modules():
            if isinstance(module, TextAttention):
                module.decode_kernel = None if path is None else DecodeAttention(path)


def register_auto_classes() -> None:
    """Make `AutoConfig` and `AutoModelForCausalLM` resolve the official `model_type`
    (`deepseek_vl_v2`) to this port. Explicit rather than at import, since it changes
    transformers' global registry; repeated calls are harmless."""
    AutoConfig.register(DeepseekOcrConfig.model_type, DeepseekOcrConfig, exist_ok=True)
    AutoModelForCausalLM.register(DeepseekOcrConfig, DeepseekOcrForCausalLM, exist_ok=True)


__all__ = [
    "DeepseekOcrForCausalLM",
    "DeepseekOcrModel",
    "DeepseekOcrPreTrainedModel",
    "VisionSpanMismatch",
    "register_auto_classes",
    "scatter_vision_spans",
    "vision_language_logits",
]
