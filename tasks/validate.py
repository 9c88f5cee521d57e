"""Judge an OCR result against its routing decision, and say what to try next.

A result is rejected when it hit the token cap, loops (a repeated unit at its end, or a long
n-gram recurring through it), or holds far less text than the page was estimated to have. A
rejected page climbs the mode ladder (each rung must give the page more vision tokens), then
falls back to its text layer, and otherwise needs review: it is never dropped. Pure functions;
the OCR batch task calls them and stores every attempt.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from infra.vocabulary import Mode
from models.deepseek_ocr.tokenizer import load_tokenizer
from models.engine import FinishReason, OcrResult
from tasks.routing import RouteDecision

# Output under this share of the estimate is a failed read. The pixel estimator is within +-35%
# on born-digital text, so a quarter leaves a wide margin.
SHORT_OUTPUT_RATIO = 0.25
MIN_ESTIMATE_FOR_SHORT_CHECK = 50  # tokens; sparse pages legitimately vary a lot
# Tail loop: a unit of up to LOOP_MAX_PERIOD tokens repeated LOOP_MIN_REPEATS times back to back,
# spanning at least LOOP_MIN_SPAN tokens.
LOOP_MAX_PERIOD = 200
LOOP_MIN_REPEATS = 4
LOOP_MIN_SPAN = 40
# Body loop: an n-gram this long occurring this often (the decoder bans exact repeats within its
# 50-token window, so loops it lets through are long).
REPEAT_NGRAM = 20
REPEAT_NGRAM_COUNT = 4
TABLE_MARKUP = re.compile(r"</?t[dr]>|<br\s*/?>|\s")

NextStep = Mode | Literal["text-layer", "needs_review"]


@dataclass(frozen=True)
class Validation:
    accepted: bool
    reason: str | None = None


def _has_content(text: str) -> bool:
    """Whether a repeated unit is more than table markup and whitespace (empty table rows
    legitimately repeat)."""
    return any(ch.isalnum() for ch in TABLE_MARKUP.sub("", text))


def find_tail_loop(ids: Sequence[int]) -> tuple[int, int] | None:
    """(period, repeats) of a unit repeated back to back at the end of `ids`, if any."""
    tokens = np.asarray(ids)
    n = len(tokens)
    for period in range(1, min(LOOP_MAX_PERIOD, n // LOOP_MIN_REPEATS) + 1):
        matches = tokens[period:] == tokens[:-period]  # position i+period repeats position i
        mismatch = np.flatnonzero(~matches)
        run = len(matches) - 1 - mismatch[-1] if len(mismatch) else len(matches)
        repeats = 1 + run // period
        if repeats >= LOOP_MIN_REPEATS and run + period >= LOOP_MIN_SPAN:
            return period, repeats
    return None


def find_repeated_ngram(ids: Sequence[int]) -> tuple[tuple[int, ...], int] | None:
    """The most frequent REPEAT_NGRAM-gram if it occurs at least REPEAT_NGRAM_COUNT times."""
    if len(ids) < REPEAT_NGRAM * REPEAT_NGRAM_COUNT:
        return None
    counts = Counter(tuple(ids[i : i + REPEAT_NGRAM]) for i in range(len(ids) - REPEAT_NGRAM + 1))
    ngram, count = counts.most_common(1)[0]
    return (ngram, count) if count >= REPEAT_NGRAM_COUNT else None


def _loop_reason(ids: list[int]) -> str | None:
    tokenizer = load_tokenizer()
    tail = find_tail_loop(ids)
    if tail is not None:
        period, repeats = tail
        unit = tokenizer.decode(ids[len(ids) - period :])
        if _has_content(unit):
            return f"loops: the last {period}-token unit {unit[:40]!r} repeats {repeats} times"
    repeated = find_repeated_ngram(ids)
    if repeated is not None:
        ngram, count = repeated
        text = tokenizer.decode(list(ngram))
        if _has_content(text):
            return f"loops: the {REPEAT_NGRAM}-gram {text[:40]!r} occurs {count} times"
    return None


def validate_result(result: OcrResult, decision: RouteDecision) -> Validation:
    """Accept `result` or reject it with a human-readable reason."""
    if result.finish_reason == FinishReason.LENGTH:
        used = f" ({result.output_tokens} tokens)" if result.output_tokens else ""
        return Validation(False, f"hit the output token cap{used} without finishing")
    ids = load_tokenizer().encode(result.markdown)
    loop = _loop_reason(ids)
    if loop is not None:
        return Validation(False, loop)
    estimate = decision.est_text_tokens
    if estimate >= MIN_ESTIMATE_FOR_SHORT_CHECK and len(ids) < SHORT_OUTPUT_RATIO * estimate:
        return Validation(
            False,
            f"far less text than estimated: {len(ids)} tokens, "
            f"{len(ids) / estimate:.0%} of {estimate}",
        )
    return Validation(True)


def next_attempt(decision: RouteDecision, mode: Mode | None, has_text_layer: bool) -> NextStep:
    """After a rejected attempt in `mode`: the next mode that gives this page more vision
    tokens, else the text layer if the page has one, else `needs_review`.

    A `mode` of None (an engine without modes) goes straight to the fallback.
    """
    if mode is not None:
        current = decision.vision_tokens_in(mode)  # priced for the model it was planned for
        candidate = mode.next_up()
        while candidate is not None:
            if decision.vision_tokens_in(candidate) > current:
                return candidate
            candidate = candidate.next_up()
    return "text-layer" if has_text_layer else "needs_review"
