"""`DeepseekOcrEngine` end to end on CPU: a tiny formula checkpoint, a rendered PDF page."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pymupdf
import pytest
import torch
from PIL import Image

from infra.settings import EngineChoice, Settings
from infra.vocabulary import Mode
from models.deepseek_ocr.decode_attention import DecodeAttention
from models.deepseek_ocr.decoder import TextAttention
from models.deepseek_ocr.engine import DeepseekOcrEngine
from models.engine import FinishReason, OcrEngine, OcrRequest
from models.registry import build_engine

SAMPLE_PDF = Path(__file__).resolve().parents[1] / "samples" / "report.pdf"


@pytest.fixture(scope="module")
def page() -> tuple[Image.Image, float, float]:
    with pymupdf.open(SAMPLE_PDF) as document:
        first = document[0]
        pixmap = first.get_pixmap(dpi=72)
        image = Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)
        return image, first.rect.width, first.rect.height


def test_engine_recognises_a_mixed_mode_batch(tiny_checkpoint: Path, page) -> None:
    torch.set_num_threads(2)
    engine = DeepseekOcrEngine.from_checkpoint(tiny_checkpoint, max_new_tokens=6, max_batch=2)
    assert isinstance(engine, OcrEngine)
    assert engine.model.lm_head.weight.dtype == torch.float32

    image, width, height = page
    requests = [
        OcrRequest(key="p1", image=image, mode=Mode.TINY, page_width=width, page_height=height),
        OcrRequest(
            key="p2",
            image=image,
            mode=Mode.GUNDAM,
            page_width=width,
            page_height=height,
            max_new_tokens=4,
        ),
        OcrRequest(key="p3", image=image, mode=None, page_width=width, page_height=height),
    ]
    results = engine.recognize(requests)

    assert [r.key for r in results] == ["p1", "p2", "p3"]
    tiny, gundam, default = results
    assert tiny.mode is Mode.TINY and tiny.vision_tokens == 73 and tiny.valid_vision_tokens == 64
    assert gundam.vision_tokens == default.vision_tokens > 273  # tiled
    assert default.mode is Mode.GUNDAM
    prompt_tail = len(engine.tokenizer.encode("\n<|grounding|>Convert the document to markdown."))
    assert tiny.prompt_tokens == 1 + 73 + prompt_tail
    for result, limit in zip(results, (6, 4, 6), strict=True):
        assert result.engine == "deepseek-ocr" and len(result.model_revision) == 12
        assert result.finish_reason in (FinishReason.EOS, FinishReason.LENGTH)
        assert 1 <= result.output_tokens <= limit
        if result.finish_reason is FinishReason.LENGTH:
            assert result.output_tokens == limit
        assert result.encode_ms > 0 and result.decode_ms > 0
        assert isinstance(result.markdown, str) and isinstance(result.raw_output, str)


@pytest.mark.parametrize("path", ["sdpa", "triton"])
def test_the_engine_takes_the_path_from_settings(tiny_checkpoint, path: str) -> None:
    """OCRFLOW_DECODE_ATTENTION reaches every attention module of an engine built from settings
    (a GPU worker's), and engines built with different paths are not shared."""
    settings = Settings(
        engine=EngineChoice.DEEPSEEK,
        model_path=tiny_checkpoint,
        device="cpu",
        decode_attention=path,
    )
    engine = build_engine(settings)
    kernels = {
        module.decode_kernel
        for module in engine.model.modules()
        if isinstance(module, TextAttention)
    }
    assert kernels == {DecodeAttention(path)}


def test_overlapped_encoding_is_taken_from_settings(tiny_checkpoint, monkeypatch) -> None:
    """Engines built from settings encode on the encoder thread unless OCRFLOW_OVERLAP_ENCODING
    turns it off, and the engine still reads pages with it on."""
    settings = partial(
        Settings, engine=EngineChoice.DEEPSEEK, model_path=tiny_checkpoint, device="cpu"
    )
    engine = build_engine(settings())
    assert engine.settings.encode_thread
    monkeypatch.setenv("OCRFLOW_OVERLAP_ENCODING", "false")
    plain = build_engine(settings())
    assert plain is not engine and not plain.settings.encode_thread
    gathering = build_engine(settings(admit_wait_seconds=1.5))
    assert gathering is not engine and gathering.settings.admit_wait_s == 1.5
    assert engine.settings.admit_wait_s == 0.5
    image = Image.new("RGB", (320, 240), "white")
    requests = [OcrRequest(str(i), image, Mode.TINY, 612.0, 792.0) for i in range(3)]
    assert [r.markdown for r in engine.recognize(requests)] == [
        r.markdown for r in plain.recognize(requests)
    ]
