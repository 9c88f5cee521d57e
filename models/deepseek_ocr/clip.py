"""CLIP-L/14 encoder of DeepSeek-OCR's DeepEncoder, fed with SAM features instead of pixels.

Differences from a stock CLIP vision tower, all from the official `deepencoder`: the patch
embeddings are SAM's compressed features (the checkpoint's `patch_embedding` conv is loaded
but never used), the 16x16 position grid is resized to the feature grid, attention uses one
fused `qkv_proj`, and there is no post-layernorm. Attribute names equal the checkpoint's
(`model.vision_model.*`).

Shape legend: B views, g x g the SAM feature grid (S/64), T = 1 + g*g tokens (class token
first), C the CLIP width (1024), n heads, d head size (64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.deepseek_ocr.config import ClipConfig
from models.deepseek_ocr.sam import resize_position_grid


def quick_gelu(hidden_states: torch.Tensor) -> torch.Tensor:
    return hidden_states * torch.sigmoid(1.702 * hidden_states)


class ClipVisionEmbeddings(nn.Module):
    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.grid_size = config.grid_size
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        # In the checkpoint but unused: SAM features replace the patch projection.
        self.patch_embedding = nn.Conv2d(
            3, config.hidden_size, config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def forward(self, patch_embeds: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = patch_embeds.shape
        tokens = patch_embeds.flatten(2).transpose(1, 2)  # (B, C, g, g) -> (B, g*g, C)
        cls = self.class_embedding.expand(batch, 1, channels)  # (B, 1, C)
        embeddings = torch.cat([cls, tokens], dim=1)  # (B, T, C)
        return embeddings + self._positions(height, width)

    def _positions(self, height: int, width: int) -> torch.Tensor:
        """The class row as stored, the grid rows resized to `(height, width)`: `(1, T, C)`."""
        table = self.position_embedding.weight  # (1 + 16*16, C)
        grid = table[1:].T.reshape(1, -1, self.grid_size, self.grid_size)  # (1, C, 16, 16)
        grid = resize_position_grid(grid, height, width)  # (1, C, g, g)
        return torch.cat([table[:1], grid.flatten(2)[0].T], dim=0)[None]


class ClipAttention(nn.Module):
    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        # Output rows: all heads' queries, then keys, then values.
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch, tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, n, T, d)
        attended = F.scaled_dot_product_attention(query, key, value)  # bidirectional
        return self.out_proj(attended.transpose(1, 2).reshape(batch, tokens, -1))  # (B, T, C)


class ClipMlp(nn.Module):
    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(hidden_states)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = ClipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClipMlp(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states))
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class ClipTransformer(nn.Module):
    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(config) for _ in range(config.num_layers))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class ClipVisionModel(nn.Module):
    """SAM features `(B, C, g, g)` to CLIP hidden states `(B, 1 + g*g, C)`, class token first."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.embeddings = ClipVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.transformer = ClipTransformer(config)

    def forward(self, sam_features: torch.Tensor) -> torch.Tensor:
        hidden_states = self.pre_layrnorm(self.embeddings(sam_features))  # (B, T, C)
        return self.transformer(hidden_states)  # no post-layernorm


__all__ = ["ClipVisionModel"]
