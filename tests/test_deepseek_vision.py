"""DeepEncoder: shapes and span layout on a tiny config, and (slow) full-size parity with the
official encoder's golden outputs under the formula weights."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.formula_weights import fill_with_formula, formula_tensor
from models.deepseek_ocr.processor import normalize_pixels, page_views
from models.deepseek_ocr.sam import SamVisionAttention
from models.deepseek_ocr.vision import (
    DeepEncoder,
    VisionInputError,
    encoder_batch_size_set,
    encoder_batch_sizes,
)
from tests.conftest import PARITY_DIR


@pytest.fixture(scope="module")
def tiny_encoder() -> DeepEncoder:
    encoder = DeepEncoder(DeepseekOcrConfig.tiny())
    fill_with_formula(encoder)
    return encoder.eval()


@torch.no_grad()
@pytest.mark.parametrize(("side", "tokens"), [(128, 2), (192, 3), (256, 4)])
def test_view_features_have_one_vector_per_64_pixels(tiny_encoder, side, tokens):
    # 128 and 192 px resize both position tables and pad SAM's windows; 256 px needs neither.
    features = tiny_encoder.view_features(torch.randn(2, 3, side, side))
    assert features.shape == (2, tokens, tokens, 64)
    assert torch.isfinite(features).all()


@torch.no_grad()
def test_span_stitches_tiles_row_major_before_global_and_separator(tiny_encoder):
    w_tiles, h_tiles, q, g, dim = 3, 2, 2, 3, 64
    # Tile features encode (tile, row, col) in channel 0; the global grid encodes 100 + cell.
    tiles = torch.zeros(w_tiles * h_tiles, q, q, dim)
    for tile in range(w_tiles * h_tiles):
        for row in range(q):
            for col in range(q):
                tiles[tile, row, col, 0] = tile * 10 + row * 2 + col
    global_features = torch.zeros(g, g, dim)
    global_features[..., 0] = 100 + torch.arange(g * g, dtype=torch.float32).view(g, g)

    span = tiny_encoder.image_span(global_features, tiles, (w_tiles, h_tiles))

    local_cols = w_tiles * q + 1
    local_len = h_tiles * q * local_cols
    assert len(span) == local_len + g * (g + 1) + 1
    newline, separator = tiny_encoder.image_newline, tiny_encoder.view_seperator
    for row in range(h_tiles * q):
        for col in range(w_tiles * q):
            tile = (row // q) * w_tiles + col // q
            expected = tile * 10 + (row % q) * 2 + col % q
            assert span[row * local_cols + col, 0] == expected
        assert torch.equal(span[row * local_cols + w_tiles * q], newline)
    for row in range(g):
        for col in range(g):
            assert span[local_len + row * (g + 1) + col, 0] == 100 + row * g + col
        assert torch.equal(span[local_len + row * (g + 1) + g], newline)
    assert torch.equal(span[-1], separator)


@torch.no_grad()
def test_span_without_tiles_is_global_rows_then_separator(tiny_encoder):
    span = tiny_encoder.image_span(torch.ones(2, 2, 64), torch.empty(0, 2, 2, 64))
    assert len(span) == 2 * 3 + 1
    assert torch.equal(span[2], tiny_encoder.image_newline)
    assert torch.equal(span[-1], tiny_encoder.view_seperator)


@torch.no_grad()
def test_mixed_mode_batch_equals_one_image_at_a_time(tiny_encoder):
    generator = torch.Generator().manual_seed(1)

    def views(*shape):
        return torch.rand(*shape, generator=generator) * 2 - 1

    # A 128-px page, a 192-px page tiled 2x1 with 128-px tiles (same size as page 0's view),
    # and a 256-px page tiled 1x2.
    global_views = [views(3, 128, 128), views(3, 192, 192), views(3, 256, 256)]
    tiles = [None, views(2, 3, 128, 128), views(2, 3, 128, 128)]
    grids = [(1, 1), (2, 1), (1, 2)]

    batched = tiny_encoder.encode_images(global_views, tiles, grids)
    chunked = tiny_encoder.encode_images(global_views, tiles, grids, views_per_batch=1)

    assert [len(span) for span in batched] == [
        2 * 3 + 1,
        2 * (4 + 1) + 3 * 4 + 1,
        4 * (2 + 1) + 4 * 5 + 1,
    ]
    for index, (global_view, image_tiles, grid) in enumerate(
        zip(global_views, tiles, grids, strict=True)
    ):
        tile_features = None if image_tiles is None else tiny_encoder.view_features(image_tiles)
        alone = tiny_encoder.image_span(
            tiny_encoder.view_features(global_view[None])[0], tile_features, grid
        )
        torch.testing.assert_close(batched[index], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(chunked[index], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("limit", [None, 32, 24, 1])
def test_encoder_batches_take_a_few_sizes_whatever_the_view_count(limit):
    """A bounded set of batch shapes bounds cuDNN's per-shape plan caches (host memory)."""
    seen: set[int] = set()
    for count in range(300):
        sizes = encoder_batch_sizes(count, limit)
        assert sum(sizes) == count
        assert all(0 < size <= (limit or count) for size in sizes)
        seen.update(sizes)
    powers = {1 << k for k in range(9)}  # up to 256: a count of 299 without a limit
    assert seen <= powers | {limit}
    if limit:
        assert len(seen) <= limit.bit_length() + 1
    assert seen == set(encoder_batch_size_set(limit, 299))  # what a worker warms up


@torch.no_grad()
def test_warm_up_encodes_every_view_shape_once(tiny_encoder):
    """Each (side, batch size) goes through SAM once, so no page waits for cuDNN's first-use
    plan of its shape."""
    shapes = []
    hook = tiny_encoder.sam_model.register_forward_hook(
        lambda module, args, output: shapes.append(tuple(args[0].shape))
    )
    try:
        count = tiny_encoder.warm_up([64, 128], encoder_batch_size_set(3, 3))
    finally:
        hook.remove()
    assert count == 6
    assert shapes == [(batch, 3, side, side) for side in (64, 128) for batch in (1, 2, 3)]


@torch.no_grad()
def test_uint8_views_encode_as_their_normalised_values(tiny_encoder):
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (3, 128, 128), generator=generator, dtype=torch.uint8)
    tiles = torch.randint(0, 256, (2, 3, 128, 128), generator=generator, dtype=torch.uint8)
    from_bytes = tiny_encoder.encode_images([pixels], [tiles], [(2, 1)])[0]
    from_floats = tiny_encoder.encode_images(
        [normalize_pixels(pixels)], [normalize_pixels(tiles)], [(2, 1)]
    )[0]
    assert torch.equal(from_bytes, from_floats)


def test_sam_attention_keeps_its_position_terms_only_while_its_tables_stay():
    """Terms kept per map size give the same output as terms built afresh, and new table
    weights (a checkpoint loaded into a model that already ran) are used, not the kept ones."""
    config = DeepseekOcrConfig.tiny().sam
    attention = SamVisionAttention(config, input_size=6)
    generator = torch.Generator().manual_seed(3)
    for table in (attention.rel_pos_h, attention.rel_pos_w):
        table.data = torch.randn(table.shape, generator=generator)
    maps = [torch.randn(2, side, side, config.hidden_size, generator=generator) for side in (6, 4)]
    with torch.enable_grad():  # nothing kept: every term built afresh
        built = [attention(hidden).detach() for hidden in maps]
    with torch.no_grad():
        assert all(torch.equal(attention(h), b) for h, b in zip(maps, built, strict=True))
        assert all(torch.equal(attention(h), b) for h, b in zip(maps, built, strict=True))
        attention.rel_pos_h.copy_(torch.randn(attention.rel_pos_h.shape, generator=generator))
        after_load = attention(maps[0])
    with torch.enable_grad():
        expected = attention(maps[0]).detach()
    assert torch.equal(after_load, expected)
    assert not torch.allclose(after_load, built[0])


def test_tiles_that_do_not_fill_the_grid_are_rejected(tiny_encoder):
    with pytest.raises(VisionInputError, match="3 tiles"):
        tiny_encoder.image_span(torch.ones(2, 2, 64), torch.ones(3, 2, 2, 64), (2, 2))
    with pytest.raises(VisionInputError, match="views must be"):
        tiny_encoder.encode_images([torch.ones(3, 128, 96)], [None], [(1, 1)])


# --- full-size parity (reference/parity/README.md §8, float32 tolerances) ---

SAM_TOLERANCE = {"atol": 2e-4, "rtol": 1e-4}
FEATURE_TOLERANCE = {"atol": 5e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def parity_encoder() -> DeepEncoder:
    config = DeepseekOcrConfig.from_official_json(PARITY_DIR)
    with torch.device("meta"):
        encoder = DeepEncoder(config)
    weights = {
        name: formula_tensor(f"model.{name}", tensor.shape)
        for name, tensor in encoder.state_dict().items()
    }
    encoder.load_state_dict(weights, assign=True)
    return encoder.eval()


def _assert_within(port: torch.Tensor, golden: torch.Tensor, atol: float, rtol: float) -> None:
    assert port.shape == golden.shape
    excess = (port - golden).abs() - (atol + rtol * golden.abs())
    assert excess.max() <= 0, f"max abs diff {(port - golden).abs().max():.3g}"


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("case", ["A_tiny", "B_small", "B_gundam"])
def test_full_size_encoder_matches_golden(parity_encoder, case):
    meta = json.loads((PARITY_DIR / "index.json").read_text())["cases"][case]
    golden = load_file(PARITY_DIR / meta["file"])
    image = Image.open(PARITY_DIR / f"page_{meta['page']}.png")
    views = page_views(image, meta["mode"])
    assert [list(views.geometry.tile_grid)] == meta["images_spatial_crop"]

    # Record each stage's output during the one encoder pass (one call per view size).
    outputs: dict[str, list[torch.Tensor]] = {"sam": [], "clip": [], "projector": []}
    modules = {
        "sam": parity_encoder.sam_model,
        "clip": parity_encoder.vision_model,
        "projector": parity_encoder.projector,
    }
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, stage=stage: outputs[stage].append(out))
        for stage, module in modules.items()
    ]
    try:
        (span,) = parity_encoder.encode_images(
            [views.global_view], [views.tiles], [views.geometry.tile_grid]
        )
    finally:
        for hook in hooks:
            hook.remove()

    if "tap.sam.global" in golden:  # Tiny/Small store every stage of the global view
        _assert_within(outputs["sam"][-1], golden["tap.sam.global"], **SAM_TOLERANCE)
        _assert_within(outputs["clip"][-1], golden["tap.clip.global"], **FEATURE_TOLERANCE)
        projected = outputs["projector"][-1]
        _assert_within(projected, golden["tap.projector.global"], **FEATURE_TOLERANCE)
    assert len(span) == meta["n_placeholders"]
    _assert_within(span, golden["vision_span"], **FEATURE_TOLERANCE)
