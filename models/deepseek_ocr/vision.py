"""DeepEncoder: SAM + CLIP features, the projector, and the layout of an image's vision span.

One view `(3, S, S)` becomes `(S/64)^2` vectors: SAM compresses the pixels, CLIP encodes SAM's
features, the two are concatenated (CLIP first) and projected to the decoder width. An image's
span then lays them out as the official code does:

    [stitched local tiles + newline column] [global grid + newline column] [view_seperator]

where the tiles of a Gundam page are stitched into one `(q*h_tiles, q*w_tiles)` map (newline
after every stitched row, not per tile) and come *before* the global view. The placeholders
are all the same `<image>` id, so only the count has to match the prompt.

Shape legend: B views, S view side, g = S/64 tokens per side, q tokens per tile side,
D the decoder width (1280), n tiles of a page, w_tiles x h_tiles its tile grid.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.deepseek_ocr.clip import ClipVisionModel
from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.processor import normalize_pixels
from models.deepseek_ocr.sam import SamVisionEncoder


class VisionInputError(ValueError):
    """Views that cannot form an image span (non-square, or tiles that do not fill the grid)."""


def encoder_batch_sizes(count: int, limit: int | None) -> list[int]:
    """Split `count` views into encoder batches of at most `limit` (None: no limit) whose sizes
    come from a small fixed set: `limit` itself and powers of two.

    cuDNN compiles a convolution and attention plan per input shape and keeps it in host memory
    (attention plans for good), so a long-running worker that encoded every batch size from 1 to
    `limit` would grow its RSS for hours; with these sizes each view side has at most
    log2(limit) + 2 shapes. No padding: 13 views run as 8 + 4 + 1.
    """
    sizes = [limit] * (count // limit) if limit else []
    rest = count - sum(sizes)
    while rest:
        sizes.append(1 << (rest.bit_length() - 1))
        rest -= sizes[-1]
    return sizes


def encoder_batch_size_set(limit: int | None, count: int) -> list[int]:
    """Every batch size `encoder_batch_sizes` gives for up to `count` views: `limit` and the
    powers of two below it (below `count` with no limit), smallest first."""
    top = min(limit or count, count)
    sizes = {1 << n for n in range(top.bit_length()) if 1 << n <= top}
    return sorted(sizes | ({limit} if limit and limit <= count else set()))


def pixel_values_for(views: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """Views on the encoder's device and dtype; uint8 pixels travel as bytes and are normalised
    there (a quarter of float32's copy)."""
    views = views.to(device=parameter.device)
    if views.dtype == torch.uint8:
        views = normalize_pixels(views)
    return views.to(dtype=parameter.dtype)


class PinnedStaging:
    """Page-locked buffers that encoder batches are stacked into for their copy to the GPU,
    reused round robin.

    Asking the pinned allocator for a block per batch cost ~10 ms a batch on the busy host of
    a GPU worker (py-spy, docs/gpu-worker.md). A buffer is written again only once the copy that
    last read it has run (its event), so the host waits, if ever, for a copy `BUFFERS` batches
    back; each buffer grows to the largest batch it met (32 views of 1280 px: 157 MB).
    """

    BUFFERS = 3

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor | None] = [None] * self.BUFFERS
        self._copied: list[torch.cuda.Event | None] = [None] * self.BUFFERS
        self._next = 0
        self._lock = threading.Lock()  # the encoder thread and the decode loop may both encode

    def to_device(self, views: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """`views` stacked `(B, ...)` on `device`, copied without blocking the host."""
        shape, dtype = (len(views), *views[0].shape), views[0].dtype
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            index, self._next = self._next, (self._next + 1) % self.BUFFERS
            copied, buffer = self._copied[index], self._buffers[index]
            if copied is not None:
                copied.synchronize()
            if buffer is None or buffer.numel() < nbytes:
                self._buffers[index] = buffer = None  # the old block goes back first
                buffer = self._buffers[index] = torch.empty(
                    nbytes, dtype=torch.uint8, pin_memory=True
                )
            staged = torch.stack(list(views), out=buffer[:nbytes].view(dtype).view(shape))
            on_device = staged.to(device, non_blocking=True)
            self._copied[index] = torch.cuda.Event()
            self._copied[index].record(torch.cuda.current_stream(device))
        return on_device


PINNED_STAGING = PinnedStaging()


def stage_views(views: Sequence[torch.Tensor], parameter: torch.Tensor) -> torch.Tensor:
    """Same-size `(3, S, S)` views stacked as one encoder batch on the encoder's device.

    For a CUDA encoder they are stacked into pinned memory (`PINNED_STAGING`) and copied without
    blocking the host, which then gathers the next batch while the GPU encodes this one; stacking
    everything in pageable memory first held the GPU idle through a gigabyte-sized host copy per
    admission.
    """
    if parameter.is_cuda and views[0].device.type == "cpu":
        return pixel_values_for(PINNED_STAGING.to_device(views, parameter.device), parameter)
    return pixel_values_for(torch.stack(views), parameter)


def encode_in_batches(
    view_features: Callable[[torch.Tensor], torch.Tensor],
    views: Sequence[torch.Tensor],
    views_per_batch: int | None,
    parameter: torch.Tensor,
) -> torch.Tensor:
    """`view_features` over same-size `(3, S, S)` views, at most `views_per_batch` at a time
    (`encoder_batch_sizes`), each batch staged on the encoder's device on its own
    (`stage_views`, `parameter` naming the device and dtype); features concatenated."""
    features, start = [], 0
    for size in encoder_batch_sizes(len(views), views_per_batch):
        features.append(view_features(stage_views(views[start : start + size], parameter)))
        start += size
    return torch.cat(features)


class VisionProjector(nn.Module):
    """`layers` is the Linear itself, as in the checkpoint (`model.projector.layers.*`)."""

    def __init__(self, config: DeepseekOcrConfig) -> None:
        super().__init__()
        self.layers = nn.Linear(config.projector_input_dim, config.projector_output_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


@dataclass(frozen=True)
class ViewSlot:
    """Where one image's views sit in the batch of their size: `count` rows from `start`."""

    side: int
    start: int
    count: int

    def take(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        return features[self.side][self.start : self.start + self.count]


def _add_views(groups: dict[int, list[torch.Tensor]], views: torch.Tensor) -> ViewSlot:
    """Append `(k, 3, S, S)` views to the group of their size."""
    side = views.shape[-1]
    if views.ndim != 4 or views.shape[-2] != side:
        raise VisionInputError(f"views must be (k, 3, S, S), got {tuple(views.shape)}")
    group = groups.setdefault(side, [])
    start = sum(len(v) for v in group)
    group.append(views)
    return ViewSlot(side, start, len(views))


class DeepEncoder(nn.Module):
    """The vision half of DeepSeek-OCR, with the checkpoint's attribute names.

    Its parameters live directly under `model.` in the checkpoint (`model.sam_model.*`,
    `model.vision_model.*`, `model.projector.layers.*`, `model.image_newline`,
    `model.view_seperator`), so the module that holds the decoder under `model.` inherits these
    attributes from this class rather than nesting it, and the keys load 1:1.
    """

    def __init__(self, config: DeepseekOcrConfig) -> None:
        super().__init__()
        self.sam_model = SamVisionEncoder(config.sam)
        self.vision_model = ClipVisionModel(config.clip)
        self.projector = VisionProjector(config)
        self.image_newline = nn.Parameter(torch.zeros(config.projector_output_dim))
        self.view_seperator = nn.Parameter(torch.zeros(config.projector_output_dim))  # sic

    def view_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected features of same-size square views: `(B, 3, S, S)` -> `(B, g, g, D)`."""
        sam_features = self.sam_model(pixel_values)  # (B, 1024, g, g)
        clip_features = self.vision_model(sam_features)  # (B, 1 + g*g, 1024)
        fused = torch.cat(
            [clip_features[:, 1:], sam_features.flatten(2).transpose(1, 2)], dim=-1
        )  # (B, g*g, 2048): CLIP first, then SAM, without the class token
        projected = self.projector(fused)  # (B, g*g, D)
        return projected.unflatten(1, sam_features.shape[-2:])  # (B, g, g, D)

    def warm_up(self, sides: Sequence[int], batch_sizes: Sequence[int]) -> int:
        """Encode blank views of every (side, batch size) once; the shapes encoded.

        cuDNN builds its attention and convolution plans on a shape's first use: on an H200,
        hundreds of ms per shape (`bench.encode_host_time`'s `first_use`). A worker whose batch
        fills group by group meets a new shape at almost every admission, while the pages
        already admitted wait, so it builds them all before it takes a page."""
        parameter = self.image_newline
        for side in sides:
            for batch in batch_sizes:
                views = torch.zeros(
                    batch, 3, side, side, dtype=parameter.dtype, device=parameter.device
                )
                self.view_features(views)
        return len(sides) * len(batch_sizes)

    def image_span(
        self,
        global_features: torch.Tensor,
        tile_features: torch.Tensor | None = None,
        tile_grid: tuple[int, int] = (1, 1),
    ) -> torch.Tensor:
        """The vision span of one image, in prompt order: `(N, D)`.

        `global_features` is `(g, g, D)`; `tile_features` is `(n, q, q, D)` in row-major tile
        order, `tile_grid` is `(w_tiles, h_tiles)`. N = (q*h_tiles)*(q*w_tiles + 1) +
        g*(g + 1) + 1 with tiles, g*(g + 1) + 1 without.
        """
        parts = []
        if tile_features is not None and len(tile_features):
            w_tiles, h_tiles = tile_grid
            n, q, _, dim = tile_features.shape
            if n != w_tiles * h_tiles:
                raise VisionInputError(f"{n} tiles do not fill a {w_tiles}x{h_tiles} tile grid")
            stitched = tile_features.view(h_tiles, w_tiles, q, q, dim)
            stitched = stitched.permute(0, 2, 1, 3, 4)  # (h_tiles, q, w_tiles, q, D)
            parts.append(self._with_newlines(stitched.reshape(h_tiles * q, w_tiles * q, dim)))
        parts.append(self._with_newlines(global_features))
        parts.append(self.view_seperator[None])  # (1, D)
        return torch.cat(parts)

    def _with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """`(rows, cols, D)` -> `(rows * (cols + 1), D)`: `image_newline` ends every row."""
        newlines = self.image_newline.expand(grid.shape[0], 1, -1)  # (rows, 1, D)
        return torch.cat([grid, newlines], dim=1).flatten(0, 1)

    def encode_images(
        self,
        global_views: Sequence[torch.Tensor],
        tiles: Sequence[torch.Tensor | None],
        tile_grids: Sequence[tuple[int, int]],
        views_per_batch: int | None = None,
    ) -> list[torch.Tensor]:
        """Vision spans `(N_i, D)` for a batch of images, possibly of different modes.

        Image i has a global view `(3, S_i, S_i)`, tiles `(n_i, 3, T, T)` (n_i = 0 or None when
        not tiled) and a tile grid `(w_tiles, h_tiles)`. Views of equal size, whether global
        views or tiles and from whichever image, run through the encoder together, at most
        `views_per_batch` at a time (None: all of them), to bound activation memory.
        """
        if not len(global_views) == len(tiles) == len(tile_grids):
            raise VisionInputError(
                f"{len(global_views)} global views, {len(tiles)} tile sets, "
                f"{len(tile_grids)} tile grids"
            )
        groups: dict[int, list[torch.Tensor]] = {}  # view side -> views of that size
        slots: list[tuple[ViewSlot, ViewSlot | None]] = []
        for global_view, image_tiles in zip(global_views, tiles, strict=True):
            global_slot = _add_views(groups, global_view[None])
            has_tiles = image_tiles is not None and len(image_tiles) > 0
            slots.append((global_slot, _add_views(groups, image_tiles) if has_tiles else None))

        features = {
            side: self._grouped_view_features(views, views_per_batch)
            for side, views in groups.items()
        }
        spans = []
        for (global_slot, tile_slot), grid in zip(slots, tile_grids, strict=True):
            global_features = global_slot.take(features)[0]  # (g, g, D)
            tile_features = tile_slot.take(features) if tile_slot else None  # (n, q, q, D)
            spans.append(self.image_span(global_features, tile_features, grid))
        return spans

    def _grouped_view_features(
        self, groups: list[torch.Tensor], views_per_batch: int | None
    ) -> torch.Tensor:
        """Features of `(k, 3, S, S)` groups of same-size views."""
        views = [view for group in groups for view in group]  # (3, S, S) each, not copied
        return encode_in_batches(self.view_features, views, views_per_batch, self.image_newline)


__all__ = [
    "DeepEncoder",
    "VisionInputError",
    "VisionProjector",
    "encode_in_batches",
    "encoder_batch_size_set",
    "encoder_batch_sizes",
    "pixel_values_for",
    "stage_views",
]
