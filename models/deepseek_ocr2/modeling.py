"""DeepSeek-OCR 2: transformers' vision encoder and the port's DeepSeek-MoE decoder.

DeepEncoder V2 (SAM, then a Qwen2-style encoder reading SAM tokens plus 144 or 256 learned
queries) is transformers' own `DeepseekOcr2VisionModel`, with its projector and view separator
under transformers' names. The language model is the port's `TextModel`, whose module names
are the checkpoint's (`model.embed_tokens`, `model.layers.{i}.mlp.experts.{e}.gate_proj`, ...),
so the batched generator, its KV cache and CUDA graphs drive OCR-2 exactly as OCR-1.

A checkpoint folder in the original layout (what DeepSeek published and what transformers'
`save_pretrained` writes back) loads strictly through `checkpoint.load_checkpoint`; the vision
keys are renamed by transformers' own conversion mapping for `deepseek_ocr2`, the one rename
table, and the decoder keys need none.

Legend: B pages, T tokens per row, C decoder width, Q vision queries per view (144 for a 768-px
tile, 256 for the 1024-px global view), n local tiles of a page.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

import torch
from torch import nn
from transformers import DeepseekOcr2Config
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
    DeepseekOcr2VisionModel,
    DeepseekOcr2VisionRotaryEmbedding,
)

from models.deepseek_ocr.checkpoint import load_checkpoint
from models.deepseek_ocr.decoder import TextModel
from models.deepseek_ocr.kv_cache import CacheStep
from models.deepseek_ocr.modeling import (
    DeepseekOcrForCausalLM,
    scatter_vision_spans,
    vision_language_logits,
)
from models.deepseek_ocr.vision import encode_in_batches
from models.deepseek_ocr2.config import DeepseekOcr2PortConfig


class DeepseekOcr2Model(TextModel):
    """The checkpoint's `model.`: the decoder (inherited, original names) beside transformers'
    vision tower, projector and view separator."""

    def __init__(self, config: DeepseekOcr2PortConfig) -> None:
        super().__init__(config.decoder)
        vision_config = config.transformers_config.vision_config
        self.vision_tower = DeepseekOcr2VisionModel(vision_config)
        self.multi_modal_projector = nn.Linear(
            vision_config.encoder_config.hidden_size, config.decoder.hidden_size
        )
        self.view_separator = nn.Parameter(torch.zeros(config.decoder.hidden_size))

    def init_rotary_tables(self) -> None:
        """Recompute the vision encoder's RoPE buffers, which no checkpoint stores, after a
        construction on the meta device."""
        rotary = self.vision_tower.vision_encoder.rotary_emb
        with torch.device("cpu"):
            self.vision_tower.vision_encoder.rotary_emb = DeepseekOcr2VisionRotaryEmbedding(
                config=rotary.config
            )

    def embed_with_images(
        self,
        input_ids: torch.Tensor,
        images_seq_mask: torch.Tensor | None = None,
        vision_spans: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        return scatter_vision_spans(self.embed_tokens(input_ids), images_seq_mask, vision_spans)

    def view_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected query outputs of same-size views: `(B, 3, S, S)` -> `(B, Q, C)`."""
        queries = self.vision_tower(pixel_values).last_hidden_state  # (B, Q, encoder width)
        return self.multi_modal_projector(queries)

    def encode_images(
        self,
        global_views: Sequence[torch.Tensor],
        tiles: Sequence[torch.Tensor | None],
        tile_grids: Sequence[tuple[int, int]] | None = None,
        views_per_batch: int | None = None,
    ) -> list[torch.Tensor]:
        """Vision spans `(N_i, C)`: `[tile queries..., global queries, view_separator]`.

        Image i has a global view `(3, S, S)` and tiles `(n_i, 3, T, T)` (None or empty when
        not tiled), in the processor's row-major crop order. Tiles are not stitched and get no
        newline vectors, unlike OCR-1, so `tile_grids` is not needed (accepted for the
        generator's call). At most `views_per_batch` views go through the encoder at once.
        """
        tiled = [t for t in tiles if t is not None and len(t)]
        global_features = self._encode_views(list(global_views), views_per_batch)
        tile_features = iter(
            self._encode_views([v for t in tiled for v in t], views_per_batch).split(
                [len(t) for t in tiled]
            )
            if tiled
            else ()
        )
        spans = []
        for global_queries, image_tiles in zip(global_features, tiles, strict=True):  # (256, C)
            has_tiles = image_tiles is not None and len(image_tiles) > 0
            parts = [next(tile_features).flatten(0, 1)] if has_tiles else []  # (n*144, C)
            spans.append(torch.cat([*parts, global_queries, self.view_separator[None]]))
        return spans

    def _encode_views(self, views: list[torch.Tensor], views_per_batch: int | None) -> torch.Tensor:
        """`V` views `(3, S, S)` of one size -> `(V, Q, C)`, `views_per_batch` at a time."""
        return encode_in_batches(self.view_features, views, views_per_batch, self.view_separator)


def vision_key_mapping() -> Callable[[str], str]:
    """transformers' renamings of the original OCR-2 vision keys (`model.sam_model.*`,
    `model.qwen2_model.*`, `model.projector.*`, `model.view_seperator`), without those that
    move the decoder under `language_model`, which the port does not do."""
    renamings = [
        transform
        for transform in get_checkpoint_conversion_mapping("deepseek_ocr2")
        if isinstance(transform, WeightRenaming)
        and "language_model" not in str(transform.target_patterns)
    ]

    def rename(key: str) -> str:
        for renaming in renamings:  # in order: they may chain, as in transformers' loader
            key, _ = renaming.rename_source_key(key)
        return key

    return rename


class DeepseekOcr2ForCausalLM(nn.Module):
    """The whole OCR-2 model, driven like `DeepseekOcrForCausalLM` (same forward, `config.decoder`,
    `model.encode_images`), so `models.deepseek_ocr.generation.generate` decodes it."""

    def __init__(self, config: DeepseekOcr2PortConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DeepseekOcr2Model(config)
        self.lm_head = nn.Linear(config.decoder.hidden_size, config.decoder.vocab_size, bias=False)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> Self:
        """Load an OCR-2 checkpoint folder (`config.json` of model_type `deepseek_ocr2`, weights
        in the original layout) strictly: every tensor used, none missing."""
        config = DeepseekOcr2Config.from_pretrained(Path(directory))
        with torch.device("meta"):
            model = cls(DeepseekOcr2PortConfig.from_transformers(config))
        model.model.init_rotary_tables()
        load_checkpoint(model, directory, device, dtype, key_mapping=vision_key_mapping())
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

    # The decoder's experts are OCR-1's, and so is the switch of their matmul path.
    set_expert_kernel = DeepseekOcrForCausalLM.set_expert_kernel
    set_decode_attention = DeepseekOcrForCausalLM.set_decode_attention


__all__ = ["DeepseekOcr2ForCausalLM", "DeepseekOcr2Model", "vision_key_mapping"]
