"""Which way up a page's text runs, read from the PDF itself: its /Rotate and the direction of
its text-layer lines.

PyMuPDF renders a page as a viewer shows it, /Rotate applied. A page whose /Rotate or whose
text matrix turns the text sideways or upside down renders that way, and OCR then reads
nothing or noise (an upside-down page came back as "()", a sideways one as ""). The text
layer knows which way its lines run (`dir`, in the unrotated page space), so the page can be
rendered upright for the price of one text extraction, before any engine sees it. Pages
without a text layer (scans) are turned by their pixels instead (`models.orientation`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import pymupdf

RIGHT_ANGLES = (0, 90, 180, 270)
MIN_TEXT_CHARS = 8
"""Fewer characters than this (a stray page number) say nothing about the page's direction."""
MAX_SKEW_DEGREES = 20
"""Lines further than this from a right angle (a diagonal watermark) do not vote."""


class OrientationSource:
    NONE = "none"
    TEXT_LAYER = "text-layer"
    PIXELS = "pixels"


@dataclass(frozen=True)
class PageOrientation:
    """How the page's text is turned, as the page is displayed (/Rotate applied).

    `angle` is clockwise degrees (0, 90, 180, 270): 90 means the lines run top to bottom, 180
    that the page is upside down. Turning the displayed page `angle` degrees counter-clockwise
    makes it upright. `page_rotate` is the PDF's own /Rotate, kept apart because it explains
    most sideways pages. `confidence` is the share of text (characters or sampled lines) that
    runs at `angle`.
    """

    angle: int = 0
    source: str = OrientationSource.NONE
    page_rotate: int = 0
    confidence: float = 1.0

    def __post_init__(self) -> None:
        if self.angle not in RIGHT_ANGLES:
            raise ValueError(f"orientation angle must be one of {RIGHT_ANGLES}, got {self.angle}")

    @property
    def upright(self) -> bool:
        return self.angle == 0

    def to_dict(self) -> dict[str, Any]:
        """What `page.features["orientation"]` stores."""
        return asdict(self)


def upright_size(width: float, height: float, angle: int) -> tuple[float, float]:
    """(width, height) of a page drawn upright after its text was turned `angle` degrees: the
    sides swap on a quarter turn. Engines map their boxes onto this size."""
    return (height, width) if angle in (90, 270) else (width, height)


def text_layer_orientation(page: pymupdf.Page) -> PageOrientation:
    """The direction most of the page's text-layer characters run, as displayed.

    Line directions are in the unrotated page space (y down, so a `dir` of (0, 1) reads
    downwards: 90 degrees clockwise); the page's /Rotate turns the display further clockwise.
    Vertical writing (CJK, `wmode` 1) runs downwards with upright glyphs, so it does not vote.
    """
    page_rotate = page.rotation % 360
    chars_by_angle: Counter[int] = Counter()
    for block in page.get_text("dict", flags=0)["blocks"]:
        for line in block.get("lines", ()):
            chars = sum(len(span["text"].strip()) for span in line["spans"])
            angle = _right_angle(*line["dir"])
            if chars and angle is not None and not line.get("wmode"):
                chars_by_angle[angle] += chars
    total = sum(chars_by_angle.values())
    if total < MIN_TEXT_CHARS:
        return PageOrientation(page_rotate=page_rotate)
    text_angle, chars = chars_by_angle.most_common(1)[0]
    return PageOrientation(
        angle=(text_angle + page_rotate) % 360,
        source=OrientationSource.TEXT_LAYER,
        page_rotate=page_rotate,
        confidence=round(chars / total, 3),
    )


def _right_angle(cos: float, sin: float) -> int | None:
    """The right angle a line direction is closest to, or None for a diagonal line."""
    degrees = math.degrees(math.atan2(sin, cos)) % 360
    nearest = round(degrees / 90) * 90
    if abs(degrees - nearest) > MAX_SKEW_DEGREES:
        return None
    return nearest % 360


def with_engine_rotation(stored: dict[str, Any] | None, raw_output: str) -> dict[str, Any] | None:
    """A page's stored orientation (`PageOrientation.to_dict()`) after an engine that turns
    scans by their pixels (RapidOCR: `rotation` in its raw output) has read it.

    The engine saw the render, already turned by the planned angle, so the two add up. An
    engine that reports nothing, or no turn, leaves the stored orientation as it was.
    """
    try:
        report = json.loads(raw_output)
    except ValueError:
        return stored
    turned = report.get("rotation") if isinstance(report, dict) else None
    if not turned:
        return stored
    planned = PageOrientation(**stored) if stored else PageOrientation()
    return PageOrientation(
        angle=(planned.angle + int(turned)) % 360,
        source=OrientationSource.PIXELS,
        page_rotate=planned.page_rotate,
        confidence=float(report.get("rotation_confidence", 1.0)),
    ).to_dict()
