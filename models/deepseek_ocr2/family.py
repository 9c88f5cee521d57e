"""Which DeepSeek-OCR generation a checkpoint folder holds, and its loader.

The choice is read from the folder's `config.json` (`model_type`), so pointing the engine at
a DeepSeek-OCR 2 folder is enough to serve it; the family's value is the name to store beside
each page's result. Reading a family imports neither torch nor transformers, so the registry
and the router can ask it of a folder on a machine that only plans pages.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM
    from models.deepseek_ocr2.modeling import DeepseekOcr2ForCausalLM


class ModelFamily(StrEnum):
    DEEPSEEK_OCR = "deepseek-ocr"
    DEEPSEEK_OCR_2 = "deepseek-ocr-2"


# `deepseek_vl_v2` is the official v1 config's type (`config.OFFICIAL_MODEL_TYPE`, kept equal by
# a test); written out here so that reading a folder's family stays light.
MODEL_TYPES = {
    "deepseek_vl_v2": ModelFamily.DEEPSEEK_OCR,
    "deepseek_ocr2": ModelFamily.DEEPSEEK_OCR_2,
}


def checkpoint_family(directory: str | Path) -> ModelFamily:
    """The family of a checkpoint folder, from its `config.json`'s `model_type`."""
    config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        from models.deepseek_ocr.config import ConfigError

        known = ", ".join(sorted(MODEL_TYPES))
        raise ConfigError(f"model_type {model_type!r} is not a DeepSeek-OCR model ({known})")
    return MODEL_TYPES[model_type]


def load_ocr_model(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> DeepseekOcrForCausalLM | DeepseekOcr2ForCausalLM:
    """The folder's model, loaded strictly; both drive the same batched generator."""
    if checkpoint_family(directory) is ModelFamily.DEEPSEEK_OCR_2:
        from models.deepseek_ocr2.modeling import DeepseekOcr2ForCausalLM

        return DeepseekOcr2ForCausalLM.from_pretrained(directory, device=device, dtype=dtype)
    from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM

    return DeepseekOcrForCausalLM.from_pretrained(directory, device=device, dtype=dtype)


__all__ = ["MODEL_TYPES", "ModelFamily", "checkpoint_family", "load_ocr_model"]
