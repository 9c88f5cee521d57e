"""What each OCR engine can put into its output, so the router never trades a good text layer
for a reading that loses what the layer has.

DeepSeek-OCR writes formulas (LaTeX), tables (HTML), layout boxes (grounding) and text in about
100 languages through a byte-level tokenizer: any character can come out. RapidOCR
(PP-OCRv4) reads plain lines of Latin and CJK text, and only the 6,622 characters of its
recognition dictionary (no `ß`, `€`, `∅`, no Arabic): anything else on the page is read as
something that is in it (`heißt` -> `heift`, `€` -> `E`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

# The scripts `tasks.features` tells apart.
ALL_SCRIPTS = frozenset({"latin", "cjk", "cyrillic", "greek", "arabic"})
RAPIDOCR_REC_MODEL = "ch_PP-OCRv4_rec_infer.onnx"


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine's output can represent.

    `charset` returns the characters the engine can emit, or None when it can emit any; it is
    a callable so a dictionary is read only when a page needs it.
    """

    name: str
    formulas: bool
    tables: bool
    grounding: bool  # layout boxes per block
    multi_column_order: bool  # reads side-by-side columns in order
    scripts: frozenset[str]
    has_modes: bool  # DeepSeek-OCR resolution modes mean something to it
    turns_scans: bool = False  # finds a scan's orientation in its pixels while it reads
    charset: Callable[[], frozenset[str] | None] = field(default=lambda: None, compare=False)

    def unsupported_characters(self, text: str) -> dict[str, int]:
        """Non-space characters of `text` this engine cannot emit, with their counts."""
        charset = self.charset()
        if charset is None:
            return {}
        missing: dict[str, int] = {}
        for char in text:
            if not char.isspace() and char not in charset:
                missing[char] = missing.get(char, 0) + 1
        return missing


@lru_cache(maxsize=1)
def rapidocr_charset() -> frozenset[str] | None:
    """The recognition dictionary stored in RapidOCR's ONNX model (None if not installed)."""
    try:
        import onnxruntime
        import rapidocr_onnxruntime
    except ImportError:
        return None
    package = os.path.dirname(rapidocr_onnxruntime.__file__)
    path = os.path.join(package, "models", RAPIDOCR_REC_MODEL)
    if not os.path.isfile(path):
        return None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    characters = session.get_modelmeta().custom_metadata_map.get("character", "")
    return frozenset(characters.splitlines()) | {" "}


DEEPSEEK_OCR = EngineCapabilities(
    name="deepseek-ocr",
    formulas=True,
    tables=True,
    grounding=True,
    multi_column_order=True,
    scripts=ALL_SCRIPTS,
    has_modes=True,
)
RAPIDOCR = EngineCapabilities(
    name="rapidocr",
    formulas=False,
    tables=False,
    grounding=False,
    multi_column_order=True,  # XY-cut reading order (models.reading_order)
    scripts=frozenset({"latin", "cjk"}),
    has_modes=False,
    turns_scans=True,  # its line detector and direction classifier (models.orientation)
    charset=rapidocr_charset,
)
TESSERACT = EngineCapabilities(
    name="tesseract",
    formulas=False,
    tables=False,
    grounding=False,
    multi_column_order=False,
    scripts=frozenset({"latin"}),
    has_modes=False,
)

__all__ = [
    "ALL_SCRIPTS",
    "DEEPSEEK_OCR",
    "RAPIDOCR",
    "TESSERACT",
    "EngineCapabilities",
    "rapidocr_charset",
]
