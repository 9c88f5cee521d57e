"""Our DeepSeek-OCR 2 path against transformers' `DeepseekOcr2ForConditionalGeneration`.

A tiny random `deepseek_ocr2` configuration (`config.tiny_config`: real 1024/768-px views, so
the query banks and placeholder counts are the real ones; narrow and shallow everywhere else) is
saved by transformers in its checkpoint layout and loaded by our strict loader. Both paths then
share transformers' processor output: same placeholders, logits within float32 tolerance, and equal
greedy ids, for one page and for a batch of two pages of different sizes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import BatchFeature, DeepseekOcr2ForConditionalGeneration

from models.deepseek_ocr.checkpoint import CheckpointMismatchError, load_checkpoint, stored_tensors
from models.deepseek_ocr.config import ConfigError
from models.deepseek_ocr.generation import generate
from models.deepseek_ocr.generation_types import GenerationSettings
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM
from models.deepseek_ocr2.config import tiny_config
from models.deepseek_ocr2.family import ModelFamily, checkpoint_family, load_ocr_model
from models.deepseek_ocr2.modeling import DeepseekOcr2ForCausalLM, vision_key_mapping
from models.deepseek_ocr2.processor import (
    Ocr2PageInputs,
    build_processor,
    placeholders_per_page,
    split_pages,
)

PROMPTS = ["<image>\nFree OCR.", "<image>\n<|grounding|>Convert the document to markdown."]
NEW_TOKENS = 6
LOGITS_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


def page_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A page with some lines of 'text' (boxes), so views and tiles differ from each other."""
    generator = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", size, (245, 245, 240))
    draw = ImageDraw.Draw(image)
    for top in range(40, size[1] - 40, 48):
        width = int(torch.randint(size[0] // 3, size[0] - 80, (), generator=generator))
        draw.rectangle((40, top, 40 + width, top + 18), fill=(20, 20, 30))
    return image


@pytest.fixture(scope="module")
def reference() -> DeepseekOcr2ForConditionalGeneration:
    torch.manual_seed(0)
    return DeepseekOcr2ForConditionalGeneration(tiny_config()).eval()


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-deepseek-ocr2")
    reference.save_pretrained(directory)  # transformers' layout: the original checkpoint keys
    return directory


@pytest.fixture(scope="module")
def ours(checkpoint) -> DeepseekOcr2ForCausalLM:
    return DeepseekOcr2ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def processor():
    processor = build_processor()
    processor.tokenizer.padding_side = "left"  # what transformers' batched generate needs
    return processor


def process(processor, images: list[Image.Image]) -> BatchFeature:
    return processor(images=images, text=PROMPTS[: len(images)], return_tensors="pt", padding=True)


@torch.no_grad()
def reference_logits(model: DeepseekOcr2ForConditionalGeneration, batch: BatchFeature):
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding
    return model(**batch, position_ids=positions).logits


@torch.no_grad()
def check_page_logits(ours, reference, batch: BatchFeature, pages: list[Ocr2PageInputs]) -> None:
    expected = reference_logits(reference, batch)  # (B, T, V), left-padded rows
    spans = ours.model.encode_images([p.global_view for p in pages], [p.tiles for p in pages])
    for row, (page, span) in enumerate(zip(pages, spans, strict=True)):
        logits = ours(page.input_ids[None], page.images_seq_mask[None], [span])[0]  # (L, V)
        torch.testing.assert_close(
            logits, expected[row, -len(page.input_ids) :], **LOGITS_TOLERANCE
        )


def greedy_ids(ours, pages: list[Ocr2PageInputs]) -> list[list[int]]:
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, ngram_size=0, cuda_graphs=False)
    return [result.token_ids for result in generate(ours, pages, settings)]


def reference_greedy_ids(reference, batch: BatchFeature) -> list[list[int]]:
    output = reference.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = output[:, batch["input_ids"].shape[1] :].tolist()
    return [row[: row.index(1) + 1] if 1 in row else row for row in new]  # up to EOS


def test_checkpoint_loads_strictly_and_every_key_is_used(ours, reference, checkpoint):
    loaded = ours.state_dict()
    assert loaded.keys() == stored_tensors(checkpoint, vision_key_mapping()).keys()
    assert torch.equal(
        loaded["model.view_separator"], reference.model.view_separator.detach()
    )  # stored as `model.view_seperator`, renamed by transformers' own mapping
    gate_up = reference.model.language_model.layers[1].mlp.experts.gate_up_proj.detach()
    assert torch.equal(loaded["model.layers.1.mlp.experts.5.up_proj.weight"], gate_up[5, 32:])

    with torch.device("meta"):
        smaller = DeepseekOcr2ForCausalLM(ours.config)
    del smaller.model.layers[2]
    with pytest.raises(CheckpointMismatchError, match=r"unexpected: model\.layers\.2\."):
        load_checkpoint(smaller, checkpoint, key_mapping=vision_key_mapping())


def test_placeholders_follow_the_tile_count(processor, ours, reference):
    images = [page_image((600, 700), seed=1), page_image((1000, 800), seed=2)]
    batch = process(processor, images)
    pages = split_pages(batch, processor.image_token_id)
    assert [len(p.tiles) for p in pages] == [0, 4]  # both sides <= 768: no crops
    assert [p.n_placeholders for p in pages] == [257, 257 + 4 * 144]
    assert [placeholders_per_page(processor, len(p.tiles)) for p in pages] == [257, 833]
    with torch.no_grad():
        spans = ours.model.encode_images([p.global_view for p in pages], [p.tiles for p in pages])
        features = reference.get_image_features(
            batch["pixel_values"], batch["pixel_values_local"], batch["num_local_patches"]
        ).pooler_output
    assert [len(s) for s in spans] == [len(f) for f in features] == [257, 833]
    for span, feature in zip(spans, features, strict=True):
        torch.testing.assert_close(span, feature, **LOGITS_TOLERANCE)


def test_one_page_logits_and_greedy_ids_match_transformers(processor, ours, reference):
    batch = process(processor, [page_image((1000, 800), seed=2)])
    pages = split_pages(batch, processor.image_token_id)
    check_page_logits(ours, reference, batch, pages)
    assert greedy_ids(ours, pages) == reference_greedy_ids(reference, batch)


def test_batched_mixed_size_pages_match_transformers(processor, ours, reference):
    images = [page_image((600, 700), seed=1), page_image((1400, 900), seed=3)]
    batch = process(processor, images)
    pages = split_pages(batch, processor.image_token_id)
    assert len(pages[0].input_ids) != len(pages[1].input_ids)  # padded differently
    check_page_logits(ours, reference, batch, pages)
    ours_ids = greedy_ids(ours, pages)
    assert ours_ids == reference_greedy_ids(reference, batch)
    assert ours_ids[0] != ours_ids[1]  # the pages are not decoded alike by accident


def test_the_checkpoint_folder_chooses_the_model(checkpoint, tiny_checkpoint, tmp_path):
    assert checkpoint_family(checkpoint) is ModelFamily.DEEPSEEK_OCR_2
    assert checkpoint_family(tiny_checkpoint) is ModelFamily.DEEPSEEK_OCR
    assert type(load_ocr_model(checkpoint)) is DeepseekOcr2ForCausalLM
    assert type(load_ocr_model(tiny_checkpoint)) is DeepseekOcrForCausalLM
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v2"}', encoding="utf-8")
    with pytest.raises(ConfigError, match="deepseek_v2"):
        checkpoint_family(tmp_path)
