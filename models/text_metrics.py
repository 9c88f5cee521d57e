"""Character and word error rates: how OCR output is scored against known text.

Both compare whitespace-normalised text in order, so a wrong reading order counts as errors,
which is what a reader of the markdown would notice.
"""

from __future__ import annotations

from collections.abc import Sequence


def character_error_rate(predicted: str, truth: str) -> float:
    """Edit distance over characters, divided by the length of the truth."""
    return _error_rate(list(_normalise(predicted)), list(_normalise(truth)))


def word_error_rate(predicted: str, truth: str) -> float:
    """Edit distance over words, divided by the number of words in the truth."""
    return _error_rate(predicted.split(), truth.split())


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _error_rate(predicted: Sequence[str], truth: Sequence[str]) -> float:
    if not truth:
        return 0.0 if not predicted else 1.0
    return edit_distance(predicted, truth) / len(truth)


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance (insert, delete, substitute all cost 1), two rows of memory."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, item in enumerate(a, start=1):
        current = [i]
        for j, other in enumerate(b, start=1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (item != other))
            )
        previous = current
    return previous[-1]
