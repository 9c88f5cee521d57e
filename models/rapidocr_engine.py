"""CPU OCR with RapidOCR (PP-OCRv4 detection and recognition, ONNX models inside the wheel).

With its defaults RapidOCR drops whole lines of small print (detection box threshold 0.5),
runs words together when type is small, and returns lines in a top-to-bottom order that
interleaves columns. Measured on the bundled samples rendered at 144 dpi
(`bench/rapidocr_quality.py`): lower thresholds, resizing each page so its text lines are
~48 px tall, and XY-cut reading order take a born-digital page from 33% to 0.2% character
errors, a two-column page from 72% to 0%, and the noisy scan from 2.3% to 0.9%.

A scan fed sideways or upside down is turned upright before it is read (`models.orientation`,
from the detection pass this engine runs anyway), and the angle is reported as `rotation` in
the raw output. Right-to-left lines are stored in logical order."""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from importlib.metadata import version
from itertools import pairwise
from statistics import median
from typing import Any

import numpy as np
from PIL import Image

from models.engine import Block, FinishReason, OcrRequest, OcrResult
from models.orientation import PixelOrientation, orientation_from_boxes
from models.reading_order import reading_order, to_bins

ENGINE_NAME = "rapidocr"
MIN_SCALE = 0.5  # large type is shrunk (faster) but not below half size
SCALE_TOLERANCE = 0.15  # closer than this to the right size: no resampling


@dataclass(frozen=True)
class RapidOcrTuning:
    text_score: float = 0.3  # keep lines recognised with lower confidence (default 0.5)
    box_thresh: float = 0.3  # keep fainter detected text boxes (default 0.5 drops lines)
    target_line_px: float = 48  # detected line height the page is resized to
    max_side_px: int = 3400  # letter at 300 dpi; RapidOCR itself shrinks anything larger
    threads: int = 2
    classify_direction: bool = True  # turn scans by their lines before reading (`orientation`)


@dataclass(frozen=True)
class _Line:
    text: str
    score: float
    box: tuple[float, float, float, float]  # page coordinates


class RapidOcrEngine:
    """The OcrEngine for pages without a usable text layer when no GPU model is configured.

    The ONNX sessions are built on first use and kept for the life of the engine.
    """

    name = ENGINE_NAME

    def __init__(self, tuning: RapidOcrTuning | None = None) -> None:
        self.tuning = tuning or RapidOcrTuning()
        self.model_revision = version("rapidocr-onnxruntime")
        self._ocr: Any = None
        self._lock = threading.Lock()

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]:
        return [self._recognize_one(request) for request in requests]

    def session(self) -> Any:
        """The engine's `RapidOCR` (built once); `models.orientation` borrows its models."""
        with self._lock:
            if self._ocr is None:
                from rapidocr_onnxruntime import RapidOCR

                self._ocr = RapidOCR(
                    use_cls=False,
                    text_score=self.tuning.text_score,
                    det_box_thresh=self.tuning.box_thresh,
                    max_side_len=self.tuning.max_side_px,
                    intra_op_num_threads=self.tuning.threads,
                    inter_op_num_threads=1,
                )
            return self._ocr

    def _recognize_one(self, request: OcrRequest) -> OcrResult:
        image = request.image.convert("RGB")
        boxes, _timings = self.session()(_bgr(image), use_det=True, use_cls=False, use_rec=False)
        orientation = PixelOrientation(angle=0, confidence=0.0, lines=0)
        raw: list[Any] = []
        read = image
        if boxes:
            # A scan turned sideways or upside down reads as noise or nothing; the detection
            # pass we need anyway shows which way its lines run (~50 ms more, `orientation`).
            if self.tuning.classify_direction:
                orientation = orientation_from_boxes(self.session(), _bgr(image), boxes)
            raw, read = self._read(orientation.upright(image), boxes)
            if _reads_poorly(raw, boxes):
                # The classifier can misjudge a page (odd type, few lines): read it the other
                # way up once, and keep the better reading. Only poor pages pay for this.
                other = PixelOrientation((orientation.angle + 180) % 360, 0.0, orientation.lines)
                other_raw, other_read = self._read(other.upright(image), boxes)
                if _reading_weight(other_raw) > _reading_weight(raw):
                    orientation, raw, read = other, other_raw, other_read
        width, _height = _upright_page_size(request, read)
        paragraphs = _paragraphs([_line(entry, width / read.width) for entry in raw])
        blocks = [_block(paragraph, request, read) for paragraph in paragraphs]
        return OcrResult(
            key=request.key,
            markdown="\n\n".join(block.text for block in blocks),
            blocks=blocks,
            raw_output=json.dumps(
                {
                    "rotation": orientation.angle,
                    "rotation_confidence": orientation.confidence,
                    "lines": [
                        {"box": entry[0], "text": entry[1], "score": entry[2]} for entry in raw
                    ],
                }
            ),
            finish_reason=FinishReason.EOS,
            engine=self.name,
            model_revision=self.model_revision,
        )

    def _read(self, image: Image.Image, boxes: list[Any]) -> tuple[list[Any], Image.Image]:
        """Recognised lines of an upright page, and the image they were read from (resized
        so its text is the recogniser's size; the lines' boxes are in its pixels)."""
        scale = self._scale_for_text_size(image, boxes)
        if abs(scale - 1) > SCALE_TOLERANCE:
            size = (round(image.width * scale), round(image.height * scale))
            image = image.resize(size, Image.Resampling.BICUBIC)
        raw, _timings = self.session()(_bgr(image))
        return raw or [], image

    def _scale_for_text_size(self, image: Image.Image, boxes: list[Any]) -> float:
        """How much to resize the page so its median text line is `target_line_px` tall.

        The recogniser sees every line at 48 px; lines detected much smaller than that lose
        the gaps between words (9.5 pt type at 200 dpi: 31% word errors; at 300 dpi: 1%).
        A line's height is its detected box's short side, whichever way the page was turned.
        """
        line_px = median(_thickness(points) for points in boxes)
        scale = self.tuning.target_line_px / max(line_px, 1.0)
        return max(MIN_SCALE, min(scale, self.tuning.max_side_px / max(image.size)))


MIN_KEPT_LINES = 0.5
MIN_MEDIAN_SCORE = 0.7
"""A reading is poor when it kept fewer than `MIN_KEPT_LINES` of the detected lines (the rest
scored under `text_score`) or its lines' median confidence is under `MIN_MEDIAN_SCORE`: read
upside down, lines score about 0.5 and come out as scattered letters; upright print scores
over 0.9."""


def _reads_poorly(raw: list[Any], boxes: list[Any]) -> bool:
    if len(raw) < MIN_KEPT_LINES * len(boxes):
        return True
    return median(float(score) for _box, _text, score in raw) < MIN_MEDIAN_SCORE


def _reading_weight(raw: list[Any]) -> float:
    """Characters recognised (spaces aside), weighted by the recogniser's confidence."""
    return sum(len("".join(text.split())) * float(score) for _box, text, score in raw)


def _bgr(image: Image.Image) -> np.ndarray:
    return np.asarray(image)[:, :, ::-1]  # RapidOCR takes OpenCV's channel order


def _thickness(points: list[list[float]]) -> float:
    """A detected quad's short side (corners clockwise from the top left)."""
    (x0, y0), (x1, y1), _, (x3, y3) = points
    return min(math.hypot(x1 - x0, y1 - y0), math.hypot(x3 - x0, y3 - y0))


def _upright_page_size(request: OcrRequest, image: Image.Image) -> tuple[float, float]:
    """The page's size in points once upright: a page turned a quarter has its sides swapped,
    which shows as an image whose proportions are the page's the other way round."""
    width, height = request.page_width, request.page_height
    if (image.width > image.height) != (width > height) and width != height:
        return height, width
    return width, height


def _line(entry: list[Any], to_page: float) -> _Line:
    points, text, score = entry
    xs = [point[0] * to_page for point in points]
    ys = [point[1] * to_page for point in points]
    return _Line(
        text=visual_to_logical(restore_punctuation_spaces(text.strip())),
        score=float(score),
        box=(min(xs), min(ys), max(xs), max(ys)),
    )


# The recogniser often drops the space after punctuation in typewritten text ("1.The",
# "Tuesday,14"). Only spots that prose never writes without a space are repaired: a comma,
# semicolon or colon after a letter and before a letter or digit, and a full stop between a
# lower-case letter or digit and a capital (so "8.40", "1,000", "U.S.A.", "e.g." and
# "example.com" stay as they are).
_MISSING_SPACE = re.compile(r"(?<=[A-Za-z][,;:])(?=[A-Za-z0-9])|(?<=[a-z0-9]\.)(?=[A-Z])")


def restore_punctuation_spaces(text: str) -> str:
    return _MISSING_SPACE.sub(" ", text)


# Right-to-left letters (Hebrew, Arabic and their presentation forms) against left-to-right ones.
_RTL_LETTERS = re.compile(r"[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufeff]")
_LTR_LETTERS = re.compile(r"[A-Za-z\u00c0-\u024f\u0370-\u04ff\u3040-\u30ff\u4e00-\u9fff]")
# A run that keeps its own left-to-right order inside right-to-left text: Latin words and
# numbers, with the spaces and separators between their parts.
_LTR_RUN = re.compile(
    r"[A-Za-z0-9\u00c0-\u024f\u0370-\u04ff]+(?:[ .,:/%+-]+[A-Za-z0-9\u00c0-\u024f\u0370-\u04ff]+)*"
)
_MIRRORED = str.maketrans("()[]{}<>«»", ")(][}{><»«")


def is_right_to_left(text: str) -> bool:
    """Most of the letters are Hebrew or Arabic."""
    return len(_RTL_LETTERS.findall(text)) > len(_LTR_LETTERS.findall(text))


def visual_to_logical(text: str) -> str:
    """A right-to-left line as it is stored and read (logical order) from the left-to-right
    order a recogniser emits its characters in (visual order).

    CTC recognisers read a line image from left to right, so a Hebrew or Arabic line comes
    out reversed. Reversing it back, keeping embedded Latin words and numbers in their own
    order and swapping mirrored brackets, is the part of the Unicode bidi algorithm a single
    line of mostly right-to-left text needs (no python-bidi dependency). Lines that are mostly
    left to right are returned unchanged."""
    if not is_right_to_left(text):
        return text
    runs = [(m.start(), m.end()) for m in _LTR_RUN.finditer(text)]
    pieces: list[str] = []
    position = 0
    for start, end in runs:
        pieces.extend(text[position:start].translate(_MIRRORED))  # one piece per character
        pieces.append(text[start:end])
        position = end
    pieces.extend(text[position:].translate(_MIRRORED))
    return "".join(reversed(pieces))


def _paragraphs(lines: list[_Line]) -> list[list[_Line]]:
    """Lines in reading order, grouped into paragraphs: a new paragraph starts at a vertical
    gap taller than half a line, or where the next line does not sit under the previous one.
    A page written mostly right to left reads its columns from the right."""
    if not lines:
        return []
    line_height = median(line.box[3] - line.box[1] for line in lines)
    rtl = is_right_to_left("".join(line.text for line in lines))
    boxes = [line.box for line in lines]
    ordered = [lines[i] for i in reading_order(boxes, line_height, rtl=rtl)]
    paragraphs: list[list[_Line]] = [[ordered[0]]]
    for previous, line in pairwise(ordered):
        gap = line.box[1] - previous.box[3]
        overlap = min(line.box[2], previous.box[2]) - max(line.box[0], previous.box[0])
        narrower = min(line.box[2] - line.box[0], previous.box[2] - previous.box[0])
        if gap > line_height * 0.5 or gap < -line_height * 0.5 or overlap < narrower * 0.3:
            paragraphs.append([])
        paragraphs[-1].append(line)
    return paragraphs


def _block(paragraph: list[_Line], request: OcrRequest, image: Image.Image) -> Block:
    x0 = min(line.box[0] for line in paragraph)
    y0 = min(line.box[1] for line in paragraph)
    x1 = max(line.box[2] for line in paragraph)
    y1 = max(line.box[3] for line in paragraph)
    width, height = _upright_page_size(request, image)
    return Block(
        label="text",
        text="\n".join(line.text for line in paragraph),
        boxes_bins=[to_bins((x0, y0, x1, y1), width, height)],
        boxes_page=[[round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2)]],
    )
