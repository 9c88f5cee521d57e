"""How many text tokens a page holds: what the OCR output will cost and what compresses.

A trustworthy text layer is counted exactly with the DeepSeek-OCR tokenizer. Without one, the
pixel statistics' character estimate is divided by the script's characters per token, measured
with the same tokenizer on prose (non-whitespace characters per token):

| script | chars/token | measured on |
| --- | --- | --- |
| Latin | 4.0 | English prose 4.3, German 3.2, tables and numbers lower |
| CJK | 1.65 | Simplified Chinese prose 1.66 |
| Cyrillic | 2.9 | Russian prose |
| Greek | 1.7 | Greek prose |
| Arabic | 1.95 | Arabic prose |
| other | 2.0 | a conservative default (more tokens, a larger mode) |
| tables | 1.9 | the corpus's numeric tables: digits split into short tokens |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from models.deepseek_ocr.tokenizer import load_tokenizer
from tasks.pixel_stats import PixelStats

CHARS_PER_TOKEN = {
    "latin": 4.0,
    "cjk": 1.65,
    "cyrillic": 2.9,
    "greek": 1.7,
    "arabic": 1.95,
}
DEFAULT_CHARS_PER_TOKEN = 2.0
TABLE_CHARS_PER_TOKEN = 1.9


class TextEvidence(Protocol):
    """What the estimate reads of a page (`features.PageFeatures` has it)."""

    text_tokens: int
    text_trusted: bool
    pixels: PixelStats | None


@dataclass(frozen=True)
class TokenEstimate:
    """Estimated text tokens of a page and where the number comes from."""

    tokens: int
    source: str  # "text-layer" | "pixels" | "none"


def count_text_tokens(text: str) -> int:
    """Exact DeepSeek-OCR token count of `text` (the offline tokenizer, cached)."""
    return load_tokenizer().count_tokens([text])[0]


def tokens_from_chars(chars: int, script: str, *, tabular: bool = False) -> int:
    """Tokens of `chars` non-whitespace characters in `script`, per the table above."""
    per_token = CHARS_PER_TOKEN.get(script, DEFAULT_CHARS_PER_TOKEN)
    if tabular:
        per_token = min(per_token, TABLE_CHARS_PER_TOKEN)
    return round(chars / per_token)


def estimate_text_tokens(features: TextEvidence) -> TokenEstimate:
    """Text tokens a faithful transcription of the page would have.

    The trusted text layer wins unless pixels see clearly more text (text inside images).
    """
    pixel_tokens = 0
    if features.pixels is not None:
        pixels = features.pixels
        pixel_tokens = tokens_from_chars(
            pixels.est_chars, pixels.script, tabular=pixels.looks_tabular
        )
    if features.text_trusted and features.text_tokens >= pixel_tokens:
        return TokenEstimate(features.text_tokens, "text-layer")
    if features.pixels is not None and features.pixels.text_lines > 0:
        return TokenEstimate(pixel_tokens, "pixels")
    return TokenEstimate(0, "none")
