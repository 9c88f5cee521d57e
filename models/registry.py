"""Which OCR engine a process uses, chosen by `OCRFLOW_ENGINE`, built once and kept resident.

Engines are cached per process because building one is the expensive part (a DeepSeek-OCR
checkpoint on the GPU, RapidOCR's ONNX sessions); every flow run in the process reuses it.
Heavy imports happen only for the engine actually chosen.
"""

from __future__ import annotations

import threading
from pathlib import Path

from infra.settings import EngineChoice, Settings
from models.capabilities import (
    DEEPSEEK_OCR,
    DEEPSEEK_OCR_2,
    RAPIDOCR,
    TESSERACT,
    EngineCapabilities,
)
from models.deepseek_ocr2.family import ModelFamily, checkpoint_family
from models.engine import OcrEngine


class EngineUnavailableError(RuntimeError):
    """The configured engine cannot be built here (missing checkpoint, module or binary)."""


_engines: dict[tuple, OcrEngine] = {}
_lock = threading.Lock()


def build_engine(settings: Settings) -> OcrEngine:
    """The process's engine for these settings, built on first use.

    `auto` means DeepSeek-OCR when `OCRFLOW_MODEL_PATH` is set, else RapidOCR on the CPU.
    """
    choice = resolve_engine_choice(settings)
    key = _cache_key(choice, settings)
    with _lock:
        if key not in _engines:
            _engines[key] = _build(choice, settings)
        return _engines[key]


def engine_capabilities(settings: Settings) -> EngineCapabilities:
    """What the configured engine can read, without building it (routing and `plan`).

    The queue hands pages to resident DeepSeek-OCR workers, so it plans as DeepSeek-OCR. Which
    generation (so which vision budgets) is read from `OCRFLOW_MODEL_PATH`'s `config.json`
    when the folder is here; v1's otherwise.
    """
    choice = resolve_engine_choice(settings)
    if choice in (EngineChoice.DEEPSEEK, EngineChoice.QUEUE):
        return (
            DEEPSEEK_OCR_2 if model_family(settings) is ModelFamily.DEEPSEEK_OCR_2 else DEEPSEEK_OCR
        )
    if choice is EngineChoice.TESSERACT:
        return TESSERACT
    return RAPIDOCR


def model_family(settings: Settings) -> ModelFamily:
    """The DeepSeek-OCR generation in `OCRFLOW_MODEL_PATH` (v1 when there is no readable
    folder: a planning machine of a queue may not hold the checkpoint)."""
    if settings.model_path is None:
        return ModelFamily.DEEPSEEK_OCR
    config = Path(settings.model_path).expanduser() / "config.json"
    if not config.is_file():
        return ModelFamily.DEEPSEEK_OCR
    return checkpoint_family(config.parent)


def resolve_engine_choice(settings: Settings) -> EngineChoice:
    if settings.engine is EngineChoice.AUTO:
        return EngineChoice.DEEPSEEK if settings.model_path else EngineChoice.RAPIDOCR
    return settings.engine


def _cache_key(choice: EngineChoice, settings: Settings) -> tuple:
    if choice is EngineChoice.DEEPSEEK:
        return (
            choice,
            str(settings.model_path),
            settings.device,
            settings.dtype,
            settings.expert_kernel,
            settings.decode_attention,
            settings.overlap_encoding,
            settings.admit_wait_seconds,
            settings.max_new_tokens,
            settings.ngram_size,
            settings.ngram_window,
            settings.ocr_batch_size,
        )
    if choice is EngineChoice.QUEUE:
        return (
            choice,
            settings.database_url,
            settings.queue_worker_grace_seconds,
            settings.queue_lease_seconds,
            settings.queue_heartbeat_seconds,
            settings.queue_max_attempts,
        )
    return (choice,)


def _build(choice: EngineChoice, settings: Settings) -> OcrEngine:
    if choice is EngineChoice.DEEPSEEK:
        return _build_deepseek(settings)
    if choice is EngineChoice.RAPIDOCR:
        from models.rapidocr_engine import RapidOcrEngine

        return RapidOcrEngine()
    if choice is EngineChoice.QUEUE:
        from infra.db.ocr_queue import LeasePolicy
        from models.queue_engine import QueueEngine

        return QueueEngine(
            database_url=settings.database_url,
            worker_grace_seconds=settings.queue_worker_grace_seconds,
            policy=LeasePolicy.from_settings(settings),
        )
    raise EngineUnavailableError(
        f"OCRFLOW_ENGINE={choice.value} is not available in this installation "
        "(choose auto, deepseek, rapidocr or queue)"
    )


def _build_deepseek(settings: Settings) -> OcrEngine:
    if settings.model_path is None:
        raise EngineUnavailableError(
            "OCRFLOW_ENGINE=deepseek needs OCRFLOW_MODEL_PATH (a DeepSeek-OCR or DeepSeek-OCR 2 "
            "checkpoint folder)"
        )
    checkpoint_dir = Path(settings.model_path).expanduser()
    if not checkpoint_dir.is_dir():
        raise EngineUnavailableError(f"OCRFLOW_MODEL_PATH is not a directory: {checkpoint_dir}")
    try:
        from models.deepseek_ocr.engine import DeepseekOcrEngine
    except ImportError as exc:
        raise EngineUnavailableError(f"the DeepSeek-OCR engine cannot be imported: {exc}") from exc
    return DeepseekOcrEngine.from_checkpoint(
        checkpoint_dir,
        device=_resolve_device(settings.device),
        dtype=settings.dtype,
        expert_kernel=settings.expert_kernel,
        decode_attention=settings.decode_attention,
        overlap_encoding=settings.overlap_encoding,
        admit_wait_s=settings.admit_wait_seconds,
        max_new_tokens=settings.max_new_tokens,
        ngram_size=settings.ngram_size,
        ngram_window=settings.ngram_window,
        max_batch=settings.ocr_batch_size,
    )


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
