"""What each OCR engine can put into its output, so the router never trades a good text layer
for a reading that loses what the layer has.

DeepSeek-OCR writes formulas (LaTeX), tables (HTML), layout boxes (grounding) and text in about
100 languages through a byte-level tokenizer: any character can come out. RapidOCR
(PP-OCRv4) reads plain lines of Latin and CJK text, and only the 6,622 characters of its
recognition dictionary (no `ß`, `€`, `∅`, no Arabic): anything else on the page is read as
something that is in it (`heißt` -> `heift`, `€` -> `E`).

Modes are priced by a DeepSeek model family (`family`): v1's views (Tiny 64 ... Gundam
n x 100 + 256 valid tokens) or DeepSeek-OCR 2's budgets, where each mode rung caps the local
crops of a 256-token global view (`models.deepseek_ocr2.geometry`). Engines without modes are
planned with v1's prices, for token accounting.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache

from infra.vocabulary import Mode
from models.deepseek_ocr import geometry as v1_geometry
from models.deepseek_ocr2 import geometry as ocr2_geometry
from models.deepseek_ocr2.family import ModelFamily

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
    family: ModelFamily = ModelFamily.DEEPSEEK_OCR  # whose vision budgets price the modes

    def vision_tokens(self, mode: Mode, width: int, height: int) -> int:
        """Valid vision tokens of a `width` x `height` px page in `mode` for this family."""
        return family_vision_tokens(self.family, mode, width, height, valid=True)

    def crops(self, mode: Mode, width: int, height: int) -> int:
        """Local crops (v1: tiles) of a `width` x `height` px page in `mode`."""
        grid = self._grid(mode, width, height)
        return grid[0] * grid[1] if grid else 0

    def view_canvas(self, mode: Mode, width: int, height: int) -> tuple[int, int]:
        """Pixel size of the finest view a page is read at in `mode`: the canvas its crops are
        cut from, else one square view (squashed or letterboxed, the same scale either way)."""
        grid = self._grid(mode, width, height)
        if self.family is ModelFamily.DEEPSEEK_OCR_2:
            tile, side = ocr2_geometry.TILE_SIZE, ocr2_geometry.GLOBAL_SIZE
        else:
            tile, side = v1_geometry.TILE_SIZE, v1_geometry.MODE_GEOMETRY[mode].base_size
        return (tile * grid[0], tile * grid[1]) if grid else (side, side)

    def _grid(self, mode: Mode, width: int, height: int) -> tuple[int, int] | None:
        if self.family is ModelFamily.DEEPSEEK_OCR_2:
            return ocr2_geometry.crop_grid(width, height, ocr2_geometry.CROP_CAPS[Mode(mode)])
        if not v1_geometry.MODE_GEOMETRY[Mode(mode)].crop:
            return None
        grid = v1_geometry.tile_grid(width, height)
        return None if grid == (1, 1) else grid

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


def family_vision_tokens(
    family: ModelFamily | str, mode: Mode | str, width: int, height: int, *, valid: bool
) -> int:
    """A page's vision tokens in `mode` as `family` reads it: `valid` ones (what compression is
    measured against) or `<image>` placeholders (what the model encodes and attends over).
    OCR-2 encodes its padding like the rest, so for it the two are equal."""
    if ModelFamily(family) is ModelFamily.DEEPSEEK_OCR_2:
        return ocr2_geometry.count_placeholders(mode, width, height)
    if valid:
        return v1_geometry.count_valid_vision_tokens(Mode(mode), width, height)
    return v1_geometry.count_placeholders(Mode(mode), width, height)


def family_of_engine(engine_name: str) -> ModelFamily:
    """The family whose budgets an engine's stored pages were read with (v1's for every
    engine that is not DeepSeek-OCR 2, as their modes are planned with v1's prices)."""
    if engine_name == ModelFamily.DEEPSEEK_OCR_2.value:
        return ModelFamily.DEEPSEEK_OCR_2
    return ModelFamily.DEEPSEEK_OCR


DEEPSEEK_OCR = EngineCapabilities(
    name="deepseek-ocr",
    formulas=True,
    tables=True,
    grounding=True,
    multi_column_order=True,
    scripts=ALL_SCRIPTS,
    has_modes=True,
)
# Same output (the decoder and tokenizer are v1's); only the vision budgets differ.
DEEPSEEK_OCR_2 = replace(
    DEEPSEEK_OCR, name=ModelFamily.DEEPSEEK_OCR_2.value, family=ModelFamily.DEEPSEEK_OCR_2
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
    "DEEPSEEK_OCR_2",
    "RAPIDOCR",
    "TESSERACT",
    "EngineCapabilities",
    "family_of_engine",
    "family_vision_tokens",
    "rapidocr_charset",
]
