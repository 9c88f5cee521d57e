"""The official DeepSeek-OCR prompts (README / vLLM `config.py`).

The model has no chat fine-tuning: these exact completion prompts select its behaviours, so they
are kept verbatim. `<image>` marks where the page's vision tokens go (see `processor`).
"""

from __future__ import annotations

from enum import StrEnum

from models.deepseek_ocr.grounding import REF_CLOSE, REF_OPEN

GROUNDING_TAG = "<|grounding|>"


class Prompt(StrEnum):
    """Fixed prompts. Those with `<|grounding|>` answer with labelled boxes for every block."""

    DOCUMENT_MARKDOWN = "<image>\n<|grounding|>Convert the document to markdown."
    OCR_IMAGE = "<image>\n<|grounding|>OCR this image."
    FREE_OCR = "<image>\nFree OCR."
    PARSE_FIGURE = "<image>\nParse the figure."
    DESCRIBE = "<image>\nDescribe this image in detail."

    @property
    def is_grounded(self) -> bool:
        """Whether the answer carries `<|ref|>…<|det|>` layout tags for the grounding parser."""
        return GROUNDING_TAG in self.value


def locate_prompt(phrase: str) -> str:
    """The referring-grounding prompt: asks for the boxes of `phrase` on the page."""
    if "<|" in phrase or "<image>" in phrase:
        raise ValueError(f"phrase must be plain text without special tokens, got {phrase!r}")
    return f"<image>\nLocate {REF_OPEN}{phrase}{REF_CLOSE} in the image."
