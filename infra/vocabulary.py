"""The pipeline's shared words: resolution modes and page routes.

The ground floor: settings, the database, tasks and models all speak these, so they import
nothing of ocrflow's own.
"""

from __future__ import annotations

from enum import StrEnum


class Mode(StrEnum):
    """DeepSeek-OCR resolution modes, cheapest first (the escalation ladder)."""

    TINY = "tiny"
    SMALL = "small"
    BASE = "base"
    LARGE = "large"
    GUNDAM = "gundam"

    def next_up(self) -> Mode | None:
        """The next, more expensive mode, or None after the top rung."""
        ladder = list(Mode)
        index = ladder.index(self)
        return ladder[index + 1] if index + 1 < len(ladder) else None


class Route(StrEnum):
    """How a page gets its text: nothing to read, its own text layer, or OCR."""

    BLANK = "blank"
    TEXT_LAYER = "text-layer"
    OCR = "ocr"
