"""Cross-check an OCR reading against the page's own text layer before accepting it.

Validation (`tasks.validate`) sees only the output: it catches loops, truncation and far-too-short
text. It cannot see that a born-digital page's Arabic word came back as `.**`, or that an
upside-down page came back as `()`. When the page has a trustworthy text layer, that layer is a
reference: OCR that lost a script the layer has, or most of its words, is not a reading of this
page. And OCR that read (next to) nothing on a page with ink is never a reading at all.

Pure functions; `tasks.pages` calls them and stores the measurements in the rejection reason.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from tasks.features import script_counts

# Fewer letters or digits than this on a page with ink is an empty reading (`()`, `.**`).
MIN_CONTENT_CHARS = 3
# "Most of its words": below half of the layer's words found, the reading is another text.
MIN_WORD_COVERAGE = 0.5
MIN_LAYER_WORDS = 5  # fewer words than this: coverage says little, only scripts are checked
# A script is lost when the layer has at least this many of its characters and the OCR output
# keeps less than this share of them.
MIN_SCRIPT_CHARS = 3
MIN_SCRIPT_KEPT = 0.25
# CJK is written without spaces: each character counts as a word, so line breaks (which split
# runs of characters differently in the layer and in OCR) do not change the count.
CJK_CHAR = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
WORD = re.compile(rf"[{CJK_CHAR}]|[^\W{CJK_CHAR}]+")
CJK_WORD = re.compile(rf"[{CJK_CHAR}]")
MARKUP = re.compile(r"<[^>]{1,40}>|\\[A-Za-z]+")  # HTML table tags, LaTeX commands


@dataclass(frozen=True)
class CrossCheck:
    """How much of the text layer an OCR reading holds."""

    layer_words: int
    words_found: int
    char_coverage: float  # letters and digits of the layer found in the reading (multiset)
    lost_scripts: tuple[str, ...]

    @property
    def word_coverage(self) -> float:
        return self.words_found / self.layer_words if self.layer_words else 1.0

    @property
    def accepted(self) -> bool:
        if self.lost_scripts:
            return False
        return self.layer_words < MIN_LAYER_WORDS or self.word_coverage >= MIN_WORD_COVERAGE

    def summary(self) -> str:
        """The measurements, as a reason reads them."""
        text = (
            f"word coverage {self.word_coverage:.0%} ({self.words_found} of {self.layer_words} "
            f"text-layer words), character coverage {self.char_coverage:.0%}"
        )
        if self.lost_scripts:
            text += f", lost {', '.join(self.lost_scripts)} script"
        return text


def _normalise(text: str) -> str:
    """Compatibility forms folded (Arabic presentation forms, ligatures, superscripts), case
    folded, markup the engine adds (table tags, LaTeX commands) dropped."""
    return unicodedata.normalize("NFKC", MARKUP.sub(" ", text)).casefold()


def _words(text: str) -> Counter[str]:
    """Words of more than one letter, numbers, and single CJK characters."""
    return Counter(
        word
        for word in WORD.findall(text)
        if len(word) > 1 or word.isdigit() or CJK_WORD.fullmatch(word)
    )


def _content_chars(text: str) -> Counter[str]:
    return Counter(char for char in text if char.isalnum())


def content_chars(text: str) -> int:
    """Letters and digits in `text` (what an empty reading lacks)."""
    return sum(_content_chars(unicodedata.normalize("NFKC", text)).values())


def is_near_empty(text: str) -> bool:
    """Whether a reading holds (next to) no letters or digits."""
    return content_chars(text) < MIN_CONTENT_CHARS


def cross_check(ocr_text: str, layer_text: str) -> CrossCheck:
    """Compare a reading with the page's text layer: words, characters and scripts."""
    ocr, layer = _normalise(ocr_text), _normalise(layer_text)
    layer_words, ocr_words = _words(layer), _words(ocr)
    layer_chars, ocr_chars = _content_chars(layer), _content_chars(ocr)
    total_chars = sum(layer_chars.values())
    found_chars = sum((layer_chars & ocr_chars).values())
    layer_scripts, ocr_scripts = script_counts(layer), script_counts(ocr)
    lost = tuple(
        script
        for script, count in sorted(layer_scripts.items())
        if count >= MIN_SCRIPT_CHARS and ocr_scripts.get(script, 0) < MIN_SCRIPT_KEPT * count
    )
    return CrossCheck(
        layer_words=sum(layer_words.values()),
        words_found=sum((layer_words & ocr_words).values()),
        char_coverage=found_chars / total_chars if total_chars else 1.0,
        lost_scripts=lost,
    )
