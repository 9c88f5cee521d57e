"""SAM ViT-B image encoder of DeepSeek-OCR's DeepEncoder, with its neck and 16x compressor.

Follows the official `deepencoder` SAM (itself Segment Anything's ViT-B): window attention with
decomposed relative position bias, four global-attention blocks, a conv neck with channel
LayerNorms, then two stride-2 convs (`net_2`, `net_3`) that cut the token count by 16. Attribute
names equal the checkpoint's (`model.sam_model.*`), so weights load without renaming.

Shape legend: B views, S view side in pixels, H x W the patch grid (S/16 each), C the SAM width
(768), n heads, d head size (64), w the window size (14), G the stored position grid (64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.deepseek_ocr.config import SamConfig


def resize_position_grid(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a `(1, C, G, G)` position grid to `(1, C, height, width)`.

    Bicubic with antialiasing, computed in float32 and cast back, as both official encoders
    do; any other resampler moves the positions of every non-native view size.
    """
    if grid.shape[-2:] == (height, width):
        return grid
    resized = F.interpolate(
        grid.float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False
    )
    return resized.to(grid.dtype)


def relative_position_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """Per (query, key) pair along one axis of `length` positions, the table row for their offset.

    `table` is `(2M-1, d)`, stored for one axis length M; a different length linearly
    resamples it (in float32) to `2*length-1` rows. Returns `(length, length, d)`.
    """
    rows = 2 * length - 1
    if table.shape[0] != rows:
        resampled = F.interpolate(table.float().T[None], size=rows, mode="linear")  # (1, d, rows)
        table = resampled[0].T.to(table.dtype)  # (rows, d)
    positions = torch.arange(length, device=table.device)
    offsets = positions[:, None] - positions[None, :] + (length - 1)  # (L, L), 0 .. 2L-2
    return table[offsets]


def window_partition(hidden_states: torch.Tensor, window: int) -> torch.Tensor:
    """Split `(B, H, W, C)` into `(B * windows, w, w, C)`, zero-padding bottom and right."""
    batch, height, width, channels = hidden_states.shape
    pad_h, pad_w = -height % window, -width % window
    hidden_states = F.pad(hidden_states, (0, 0, 0, pad_w, 0, pad_h))
    rows, cols = (height + pad_h) // window, (width + pad_w) // window
    hidden_states = hidden_states.view(batch, rows, window, cols, window, channels)
    hidden_states = hidden_states.permute(0, 1, 3, 2, 4, 5)  # (B, rows, cols, w, w, C)
    return hidden_states.reshape(batch * rows * cols, window, window, channels)


def window_unpartition(windows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `window_partition`: `(B * windows, w, w, C)` back to `(B, H, W, C)`."""
    window, channels = windows.shape[1], windows.shape[-1]
    rows, cols = -(-height // window), -(-width // window)
    batch = windows.shape[0] // (rows * cols)
    hidden_states = windows.view(batch, rows, cols, window, window, channels)
    hidden_states = hidden_states.permute(0, 1, 3, 2, 4, 5)  # (B, rows, w, cols, w, C)
    hidden_states = hidden_states.reshape(batch, rows * window, cols * window, channels)
    return hidden_states[:, :height, :width].contiguous()  # drop the padding


class SamPatchEmbed(nn.Module):
    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            3, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).permute(0, 2, 3, 1)  # (B, 3, S, S) -> (B, H, W, C)


class SamVisionAttention(nn.Module):
    """Multi-head attention over a `(H, W)` map, with decomposed relative position bias.

    The bias of a query at (y, x) for a key at (ky, kx) is `<q, Rh[y-ky]> + <q, Rw[x-kx]>` with
    the *unscaled* query (as in SAM). Materialised as an additive mask it is `(H*W)^2` per head
    (400 MB per 1024-px view in bf16), and building and reading it dominated the encoder's time.
    Instead it rides in the dot product: each query is extended by its row and column biases,
    each key by a one-hot of its row and column, so `q'.k' = scale * q.k + bias` exactly and the
    fused attention kernel never sees a mask.
    """

    def __init__(self, config: SamConfig, input_size: int) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        # One row per relative offset at the size the table was trained for (window or grid).
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size - 1, self.head_dim))
        self._position_terms_cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(
            batch, height * width, 3, self.num_heads, self.head_dim
        )
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, n, H*W, d)
        query, key = self._with_relative_positions(query, key, height, width)
        attended = F.scaled_dot_product_attention(query, key, value, scale=1.0)
        attended = attended.transpose(1, 2).reshape(batch, height, width, -1)  # (B, H, W, C)
        return self.proj(attended)

    def _with_relative_positions(
        self, query: torch.Tensor, key: torch.Tensor, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries `(B, n, H*W, d + H + W + pad)` carrying their biases, keys the one-hots."""
        rel_h, rel_w, key_positions = self._position_terms(height, width, key.dtype, key.device)
        grid_query = query.unflatten(2, (height, width))  # (B, n, H, W, d)
        bias_h = torch.einsum("bnhwd,hkd->bnhwk", grid_query, rel_h).flatten(2, 3)  # (.., kH)
        bias_w = torch.einsum("bnhwd,wkd->bnhwk", grid_query, rel_w).flatten(2, 3)  # (.., kW)
        pad = key_positions.shape[-1] - height - width
        query = torch.cat(
            (query * self.scale, bias_h, bias_w, query.new_zeros(*query.shape[:-1], pad)), -1
        )
        key = torch.cat((key, key_positions.expand(*key.shape[:2], -1, -1)), -1)
        return query, key

    def _position_terms(
        self, height: int, width: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, ...]:
        """The row and column tables `(H, kH, d)`, `(W, kW, d)` of an `(H, W)` map and its keys'
        one-hot positions `(H*W, kH + kW + pad)`, padded so fused kernels see 8-aligned heads.

        They depend on the map's size and the tables' weights alone, so without autograd they
        are kept per size (rebuilt once the weights change): building them took ~15 small
        kernel launches per layer and batch, a sixth of the encoder's host time in a worker.
        """
        weights = tuple((t._version, t.data_ptr()) for t in (self.rel_pos_h, self.rel_pos_w))
        cache_key = (height, width, dtype, device, weights)
        keep = not torch.is_grad_enabled()
        if keep and cache_key in self._position_terms_cache:
            return self._position_terms_cache[cache_key]
        rel_h = relative_position_table(self.rel_pos_h, height)
        rel_w = relative_position_table(self.rel_pos_w, width)
        positions = torch.arange(height * width, device=device)
        key_row = F.one_hot(positions // width, height).to(dtype)  # (H*W, kH)
        key_col = F.one_hot(positions % width, width).to(dtype)  # (H*W, kW)
        pad = -(self.head_dim + height + width) % 8
        key_positions = torch.cat((key_row, key_col, key_row.new_zeros(height * width, pad)), -1)
        terms = (rel_h, rel_w, key_positions)
        if keep:
            if any(key[-1] != weights for key in self._position_terms_cache):
                self._position_terms_cache.clear()  # built from weights since replaced
            self._position_terms_cache[cache_key] = terms
        return terms


class SamMlpBlock(nn.Module):
    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        self.lin1 = nn.Linear(config.hidden_size, config.mlp_dim)
        self.lin2 = nn.Linear(config.mlp_dim, config.hidden_size)
        self.act = nn.GELU()  # exact (erf) GELU

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(hidden_states)))


class SamVisionLayer(nn.Module):
    """Pre-norm transformer block; `window_size` 0 means global attention over the whole map."""

    def __init__(self, config: SamConfig, window_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SamVisionAttention(config, input_size=window_size or config.grid_size)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SamMlpBlock(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        height, width = hidden_states.shape[1:3]
        attn_input = self.norm1(hidden_states)  # (B, H, W, C)
        if self.window_size:
            windows = window_partition(attn_input, self.window_size)  # (B * windows, w, w, C)
            attended = window_unpartition(self.attn(windows), height, width)
        else:
            attended = self.attn(attn_input)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.norm2(hidden_states))


class SamLayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map (the neck's norm)."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mean = hidden_states.mean(1, keepdim=True)
        variance = (hidden_states - mean).pow(2).mean(1, keepdim=True)
        normalized = (hidden_states - mean) / torch.sqrt(variance + self.eps)
        return self.weight[:, None, None] * normalized + self.bias[:, None, None]


class SamVisionEncoder(nn.Module):
    """Pixels `(B, 3, S, S)` to compressed features `(B, 1024, S/64, S/64)`."""

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        grid, width = config.grid_size, config.hidden_size
        self.patch_embed = SamPatchEmbed(config)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, width))
        self.blocks = nn.ModuleList(
            SamVisionLayer(config, 0 if i in config.global_attn_indexes else config.window_size)
            for i in range(config.num_layers)
        )
        neck = config.neck_channels
        self.neck = nn.Sequential(
            nn.Conv2d(width, neck, kernel_size=1, bias=False),
            SamLayerNorm2d(neck, eps=config.layer_norm_eps),
            nn.Conv2d(neck, neck, kernel_size=3, padding=1, bias=False),
            SamLayerNorm2d(neck, eps=config.layer_norm_eps),
        )
        mid, out = config.downsample_channels
        self.net_2 = nn.Conv2d(neck, mid, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(mid, out, kernel_size=3, stride=2, padding=1, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.patch_embed(pixel_values)  # (B, H, W, C)
        height, width = hidden_states.shape[1:3]
        positions = resize_position_grid(self.pos_embed.permute(0, 3, 1, 2), height, width)
        hidden_states = hidden_states + positions.permute(0, 2, 3, 1)  # (1, H, W, C) broadcast
        for block in self.blocks:
            hidden_states = block(hidden_states)
        features = self.neck(hidden_states.permute(0, 3, 1, 2))  # (B, 256, H, W)
        return self.net_3(self.net_2(features))  # (B, 512, H/2, W/2) -> (B, 1024, H/4, W/4)


__all__ = ["SamVisionEncoder", "relative_position_table", "resize_position_grid"]
