"""DeepSeek-OCR preprocessing against the official implementation's golden set.

The golden set (`tests/data/reference/parity/`) records, per case, the official views' sums
and samples, the tile grid, placeholder and valid-token counts and the prompt ids. Views must
match exactly because the port resizes and pads with Pillow like the original.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from infra.vocabulary import Mode
from models.deepseek_ocr.processor import (
    PAD_COLOR,
    PageInputs,
    PromptError,
    build_prompt_ids,
    normalize_pixels,
    page_views,
    pixel_tensor,
    prepare_page,
    prepare_page_from_ids,
    split_prompt,
)
from tests.conftest import PARITY_DIR

needs_golden = pytest.mark.skipif(
    not (PARITY_DIR / "index.json").exists(), reason=f"no golden set at {PARITY_DIR}"
)


def _index() -> dict[str, Any]:
    return json.loads((PARITY_DIR / "index.json").read_text())


def _case_names() -> list[str]:
    if not (PARITY_DIR / "index.json").exists():
        return []
    return list(_index()["cases"])


def _page(name: str) -> Image.Image:
    """A golden page, checked against the SHA-256 of its pixels recorded in the index."""
    entry = _index()["pages"][name]
    image = Image.open(PARITY_DIR / entry["file"])
    image.load()
    pixels = np.array(image.convert("RGB"), dtype=np.uint8)
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == entry["sha256_rgb_uint8"]
    return image


def _prepare_case(case: dict[str, Any]) -> PageInputs:
    prompt = _index()["prompt"]
    return prepare_page_from_ids(
        _page(case["page"]),
        case["mode"],
        prompt["prefix_ids"],
        prompt["suffix_ids"],
        bos_id=prompt["bos"],
        image_token_id=prompt["placeholder_id"],
    )


@needs_golden
@pytest.mark.parametrize("case_name", _case_names())
def test_views_and_prompt_match_the_official_preprocessing(case_name: str) -> None:
    case = _index()["cases"][case_name]
    inputs = _prepare_case(case)
    golden = load_file(PARITY_DIR / case["file"])

    assert inputs.mode == Mode(case["mode"])
    assert inputs.n_placeholders == case["n_placeholders"]
    assert inputs.valid_vision_tokens == case["valid_img_tokens"]
    assert [list(inputs.tile_grid)] == case["images_spatial_crop"]
    assert golden["images_spatial_crop"].tolist() == [list(inputs.tile_grid)]
    assert torch.equal(inputs.input_ids, golden["input_ids"])
    assert torch.equal(inputs.images_seq_mask, golden["images_seq_mask"])
    assert int(inputs.images_seq_mask.sum()) == inputs.n_placeholders

    expected_views = [v for v in case["views"] if v["role"] != "images_crop_zero_placeholder"]
    views = [inputs.global_view, *inputs.tiles]
    assert [v["role"] for v in expected_views] == ["global"] + [
        f"tile{i}" for i in range(len(inputs.tiles))
    ]
    for pixels, expected in zip(views, expected_views, strict=True):
        assert pixels.dtype == torch.uint8  # normalised on the model's device
        view = normalize_pixels(pixels)
        assert list(view.shape) == expected["shape"], expected["role"]
        flat = view.reshape(-1)
        assert flat[expected["sample_idx"]].tolist() == expected["sample_vals"], expected["role"]
        values = flat.double()
        assert values.sum().item() == pytest.approx(expected["sum"], rel=1e-9, abs=1e-9)
        assert (values**2).sum().item() == pytest.approx(expected["sum_sq"], rel=1e-9)


def test_normalisation_maps_bytes_to_minus_one_one_like_torchvision() -> None:
    image = Image.new("RGB", (3, 1))
    image.putdata([(0, 127, 255), (1, 128, 254), (245, 245, 245)])
    pixels = pixel_tensor(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 1, 3)
    tensor = normalize_pixels(pixels)
    expected = torch.tensor([[0, 1, 245], [127, 128, 245], [255, 254, 245]]).float() / 255 - 0.5
    assert torch.equal(tensor[:, 0, :], expected / 0.5)
    # The pad colour is not zero after normalisation.
    pad = normalize_pixels(pixel_tensor(Image.new("RGB", (1, 1), PAD_COLOR)))
    assert pad.flatten()[0].item() == pytest.approx(-1 / 255, abs=1e-7)


def test_base_mode_letterboxes_a_wide_page_with_grey_bands() -> None:
    page = Image.new("RGB", (2000, 1000), (255, 255, 255))
    views = page_views(page, Mode.BASE)
    assert views.global_view.shape == (3, 1024, 1024)
    assert views.tiles.shape == (0, 3, 640, 640)
    assert views.global_view[:, 100, 500].tolist() == list(PAD_COLOR)  # top band
    assert views.global_view[:, 512, 500].tolist() == [255] * 3  # page
    assert views.global_view[:, 1000, 500].tolist() == list(PAD_COLOR)  # bottom band


def test_tiny_mode_squashes_without_padding() -> None:
    page = Image.new("RGB", (2000, 1000), (255, 255, 255))
    views = page_views(page, Mode.TINY)
    assert views.global_view.shape == (3, 512, 512)
    assert torch.all(views.global_view == 255)


def test_gundam_tiles_are_row_major_crops_of_the_resized_page() -> None:
    # Left half black, right half white: the left column of the 2x3 grid must come out black.
    page = Image.new("RGB", (1240, 1754), (255, 255, 255))
    page.paste((0, 0, 0), (0, 0, 620, 1754))
    views = page_views(page, Mode.GUNDAM)
    assert views.geometry.tile_grid == (2, 3)
    assert views.tiles.shape == (6, 3, 640, 640)
    left_tiles = views.tiles[0::2]
    right_tiles = views.tiles[1::2]
    assert torch.all(left_tiles[..., :600] == 0)
    assert torch.all(right_tiles[..., 40:] == 255)


def test_small_page_in_gundam_mode_has_no_tiles() -> None:
    views = page_views(Image.new("RGB", (600, 500), (0, 0, 0)), Mode.GUNDAM)
    assert views.tiles.shape[0] == 0
    assert views.geometry.n_placeholders == 273


def test_exif_orientation_and_colour_mode_are_normalised_first() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed rotated by 90 degrees
    buffer = io.BytesIO()
    Image.new("L", (1000, 600), 255).save(buffer, format="JPEG", exif=exif)
    page = Image.open(buffer)
    views = page_views(page, Mode.GUNDAM)
    assert (views.geometry.width, views.geometry.height) == (600, 1000)
    assert views.geometry.tile_grid == (2, 3)
    assert views.global_view.shape == (3, 1024, 1024)


def test_prompt_ids_put_placeholders_between_prefix_and_suffix() -> None:
    input_ids, mask = build_prompt_ids([7, 8], 3, [9], bos_id=0, image_token_id=42)
    assert input_ids.tolist() == [0, 7, 8, 42, 42, 42, 9]
    assert mask.tolist() == [False, False, False, True, True, True, False]


class _WordTokenizer:
    """A tokenizer over a fixed word list, standing in for the real BPE vocabulary."""

    bos_id = 0
    image_token_id = 99

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


def test_text_prompt_is_stripped_and_split_at_image() -> None:
    inputs = prepare_page(
        Image.new("RGB", (300, 200)), Mode.TINY, "  ab <image> abc abcd \n", _WordTokenizer()
    )
    assert inputs.input_ids.tolist() == [0, 2, *[99] * 73, 3, 4]
    assert split_prompt("<image>\nFree OCR. ") == ("", "\nFree OCR.")


@pytest.mark.parametrize("prompt", ["Free OCR.", "<image><image>\nFree OCR."])
def test_prompts_without_exactly_one_image_are_rejected(prompt: str) -> None:
    with pytest.raises(PromptError):
        split_prompt(prompt)
