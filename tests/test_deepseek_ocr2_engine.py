"""DeepSeek-OCR 2 behind the pipeline's engine: `OCRFLOW_MODEL_PATH` at a DeepSeek-OCR 2 folder.

The folder is a tiny random `deepseek_ocr2` model saved by transformers itself (its checkpoint
layout), so the registry, the family detection, the strict loader, the processor with routed
budgets and the batched generator all run as in production, on CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import DeepseekOcr2ForConditionalGeneration

from infra.settings import EngineChoice
from infra.vocabulary import Mode
from models.capabilities import DEEPSEEK_OCR, DEEPSEEK_OCR_2
from models.deepseek_ocr import config as v1_config
from models.deepseek_ocr.engine import DeepseekOcrEngine
from models.deepseek_ocr2 import family, geometry
from models.deepseek_ocr2.config import tiny_config
from models.deepseek_ocr2.modeling import DeepseekOcr2ForCausalLM
from models.deepseek_ocr2.processor import build_processor, prepare_page, prepare_pages
from models.engine import FinishReason, OcrRequest
from models.registry import build_engine, engine_capabilities
from tests.test_deepseek_ocr2_parity import page_image

PROMPT = "<image>\n<|grounding|>Convert the document to markdown."


@pytest.fixture(scope="module")
def ocr2_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-deepseek-ocr2-engine")
    DeepseekOcr2ForConditionalGeneration(tiny_config()).save_pretrained(directory)
    return directory


def test_registry_builds_the_ocr2_engine_and_reads_a_page(ocr2_checkpoint, settings):
    torch.set_num_threads(2)
    chosen = settings.model_copy(
        update={
            "engine": EngineChoice.DEEPSEEK,
            "model_path": ocr2_checkpoint,
            "device": "cpu",
            "max_new_tokens": 4,
            "ocr_batch_size": 2,
        }
    )
    assert engine_capabilities(chosen) is DEEPSEEK_OCR_2  # planned with OCR-2's budgets
    engine = build_engine(chosen)
    assert isinstance(engine, DeepseekOcrEngine) and engine.name == "deepseek-ocr-2"
    assert isinstance(engine.model, DeepseekOcr2ForCausalLM)
    assert build_engine(chosen) is engine  # resident

    image = page_image((1000, 1400), seed=4)  # tiled: 2 crops (Small) or 6 (Gundam)
    requests = [
        OcrRequest(key=str(mode), image=image, mode=mode, page_width=500, page_height=700)
        for mode in (Mode.TINY, Mode.SMALL, Mode.GUNDAM)
    ]
    results = engine.recognize(requests)

    assert [r.vision_tokens for r in results] == [257, 257 + 2 * 144, 257 + 6 * 144]
    assert [r.vision_tokens for r in results] == [
        DEEPSEEK_OCR_2.vision_tokens(mode, *image.size)
        for mode in (Mode.TINY, Mode.SMALL, Mode.GUNDAM)
    ]  # the engine spends what the router priced
    for result, mode in zip(results, (Mode.TINY, Mode.SMALL, Mode.GUNDAM), strict=True):
        assert result.engine == "deepseek-ocr-2" and len(result.model_revision) == 12
        assert result.mode is mode and result.valid_vision_tokens == result.vision_tokens
        assert 1 <= result.output_tokens <= 4
        assert result.finish_reason in (FinishReason.EOS, FinishReason.LENGTH)
        assert result.encode_ms > 0 and result.gpu_ms > 0
    assert not any(
        name.startswith("transformers_modules") for name in sys.modules
    )  # no remote code


def test_a_v1_folder_still_plans_and_names_itself_v1(tiny_checkpoint, settings):
    chosen = settings.model_copy(
        update={"engine": EngineChoice.DEEPSEEK, "model_path": tiny_checkpoint}
    )
    assert engine_capabilities(chosen) is DEEPSEEK_OCR
    assert family.MODEL_TYPES[v1_config.OFFICIAL_MODEL_TYPE] is family.ModelFamily.DEEPSEEK_OCR


def test_budget_inputs_match_the_processor_and_the_router_prices():
    processor = build_processor()
    image = page_image((1191, 1684), seed=5)  # A4 at 144 dpi
    official = prepare_pages(processor, [image], [PROMPT])[0]  # transformers' default: Gundam
    gundam = prepare_page(processor, image, PROMPT, Mode.GUNDAM)
    assert torch.equal(gundam.input_ids, official.input_ids)
    assert torch.equal(gundam.tiles, official.tiles) and len(gundam.tiles) == 6
    for mode in Mode:
        page = prepare_page(processor, image, PROMPT, mode)
        assert page.n_placeholders == geometry.count_placeholders(mode, *image.size)
        assert torch.equal(page.global_view, official.global_view)  # one global view for all
        assert page.mode is mode
    assert len(prepare_page(processor, image, PROMPT, Mode.TINY).tiles) == 0


def test_crop_grid_is_transformers_tiling():
    from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import (
        get_optimal_tiled_canvas,
    )

    generator = torch.Generator().manual_seed(0)
    sizes = torch.randint(200, 4000, (400, 2), generator=generator).tolist()
    sizes += [[768, 768], [769, 100], [1536, 1536], [2000, 1000]]  # edges and exact ties
    for width, height in sizes:
        for cap in range(2, geometry.MAX_CROPS + 1):
            expected = (
                get_optimal_tiled_canvas((height, width), (768, 768), 2, cap)
                if max(width, height) > 768
                else None
            )
            assert geometry.crop_grid(width, height, cap) == expected, (width, height, cap)
