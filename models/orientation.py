"""Which way up a scan is, from its pixels, with the models RapidOCR already ships.

RapidOCR's detector finds text lines whichever way they run: on a page scanned sideways its
boxes are tall and thin. Its direction classifier (`cls`, PP-OCR mobile, 0 or 180 degrees per
line crop) then says whether those lines, cut out and laid flat, are upright or upside down.
Together they give the page's angle from a dozen of its longest lines for ~50 ms on two cores,
on top of a detection pass the engine runs anyway; trying the four rotations through
recognition instead would cost up to four times a page's OCR.

For engines that do not turn scans themselves the CPU workers run the check on its own
(`detect_pixel_orientation`), where no detection pass comes for free: the lines of a straight
page are first cut out by projection profiles (milliseconds), and the detector runs only where
that cut is not clear-cut. Cost and decisions of both are measured by `bench/orientation.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

from models.ink_cuts import long_runs, skew, xy_cut

SAMPLE_LINES = 12  # the longest lines carry the most evidence; more add time, not accuracy
MIN_ELONGATION = 2.0  # a box this much longer than thick has an unambiguous direction
MIN_FLIP_SHARE = 2 / 3
"""Share of sampled lines the classifier must call upside down before an upright-looking page
is turned over: on upright pages it misreads the odd short or italic line."""
CLASSIFIER_ASPECT = 4  # the classifier's input is 192 x 48 pixels
PIECES_PER_LINE = 3
DETECT_MIN_SIDE = 672
"""Short side the page is scaled to for `detect_pixel_orientation` (lines stay ~10 px thick),
then cut to its ink. The detector runs at that size as it is: RapidOCR's own preprocessing
would scale a short side under 736 px back up, costing the pixels the cut saved
(`bench/orientation.py`: 90 of 92 pages right way up in 0.25 s, against 87 in 0.40 s when the
page was scaled to 960 px on its long side and the detector scaled that up again)."""
CUT_GUTTER_PX = 12  # a column gap at `DETECT_MIN_SIDE` (~10 pt on A4); word spaces are narrower
CUT_LINE_HEIGHT_PX = (5, 60)  # body text to headings at `DETECT_MIN_SIDE`
CUT_RULE_PX = 40  # an ink run this long is a rule (~0.5 in at `DETECT_MIN_SIDE`), not a glyph
CUT_LINE_ELONGATION = 5  # a leaf this much longer than high is a line, not a word or a picture
CUT_MIN_LINES = 3
CUT_MIN_GAP_SHARE = 0.2  # rows between lines: 0.2-0.6 of a text page's rows; tables ~0.06
CUT_AXIS_DOMINANCE = 2.5
"""Gap share one way over the other before the cut lines decide the axis: text turned a quarter
has at most 0.13 (CJK, margins included) to a level page's 0.3-0.6 (`bench/orientation.py`)."""
CUT_GAP_STRIPS = 4
"""Strips the gaps are counted in when the whole page's rows do not decide: a newspaper has
0.1 of its rows empty across the page, 0.26-0.28 within a strip against 0.08 turned a quarter;
a ruled table 0.06 and 0.57 against 0.00 (more strips raise a slide's sideways share)."""
CUT_FIRST_LINES = 4
CUT_SURE_AGREEMENT = 0.95
"""The classifier first sees the `CUT_FIRST_LINES` longest cut lines; a vote short of this
agreement brings in the rest of the sample (most pages are decided by the first four lines at a
third of the classifier's cost)."""
CUT_MIN_AGREEMENT = 0.8
"""Share of the classifier's vote the cut lines need; a closer vote goes to the detector."""
INK_LEVEL = 160  # grey level under which a pixel is ink, for the cut
MAX_SKEW_DEGREES = 5.0  # a sheet fed askew: the feeder's guides keep it within a few degrees
MIN_STRAIGHTEN_DEGREES = 0.3  # less leaves the gaps between lines open
SKEW_SAMPLE_PIXELS = 20_000  # ink pixels weighed for the skew: enough to place the lines
SPECK_PX = 2  # a row or column with no more ink than this is empty: scanner dust is not ink
INK_MARGIN = 16  # pixels kept around the ink: the detector needs a little background
DETECTOR_THREADS = 1
"""ONNX threads of `shared_detector`: the CPU workers already run one process per core, so more
threads per process only compete with the other workers (`bench/orientation.py`, 2 cores: two
workers check 3.7 pages/s with one thread each, 2.4 with two)."""


DETECTOR = "detector"
CUT_LINES = "cut-lines"


@dataclass(frozen=True)
class PixelOrientation:
    """`angle`: clockwise degrees the image's text is turned (0, 90, 180, 270); turning the
    image `angle` degrees counter-clockwise makes it upright. `confidence`: share of the
    sampled lines that agree. `lines`: how many lines were sampled. `method`: what found the
    lines (`DETECTOR` or `CUT_LINES`)."""

    angle: int
    confidence: float
    lines: int
    method: str = DETECTOR

    def upright(self, image: Image.Image) -> Image.Image:
        """`image` turned so its text is upright."""
        return image.rotate(self.angle, expand=True) if self.angle else image


def orientation_from_boxes(ocr: Any, pixels: np.ndarray, boxes: list[Any]) -> PixelOrientation:
    """The text's angle, from RapidOCR detection `boxes` (quads in `pixels`' coordinates).

    `ocr` is a `rapidocr_onnxruntime.RapidOCR`; its own crop helper lays a tall crop flat by
    turning it 90 degrees counter-clockwise, so text running downwards (a page turned 90
    degrees clockwise) comes out upright and text running upwards (270) upside down.
    """
    quads = np.asarray(boxes, dtype=np.float32).reshape(-1, 4, 2)  # (N, 4 corners, xy)
    along = np.linalg.norm(quads[:, 1] - quads[:, 0], axis=1)  # top edge
    across = np.linalg.norm(quads[:, 3] - quads[:, 0], axis=1)  # left edge
    long_side, short_side = np.maximum(along, across), np.minimum(along, across)
    elongated = long_side >= MIN_ELONGATION * np.maximum(short_side, 1.0)
    if not elongated.any():
        return PixelOrientation(angle=0, confidence=0.0, lines=0)
    tall = across > along
    sideways = long_side[elongated & tall].sum() > long_side[elongated & ~tall].sum()
    candidates = np.flatnonzero(elongated & (tall if sideways else ~tall))
    sample = candidates[np.argsort(-long_side[candidates])][:SAMPLE_LINES]
    crops = ocr.get_crop_img_list(pixels, [quads[i] for i in sample])
    angle, agreement = _angle_from_vote(_flipped_share(ocr, crops), sideways)
    return PixelOrientation(angle=angle, confidence=round(agreement, 3), lines=len(crops))


def _angle_from_vote(flipped: float, sideways: bool) -> tuple[int, float]:
    """(angle, agreement) from the classifier's upside-down share for lines laid flat by a
    quarter turn counter-clockwise (`sideways`) or as they were."""
    if sideways:  # it has to be turned one way or the other: the majority decides
        return (270, flipped) if flipped > 0.5 else (90, 1 - flipped)
    return (180, flipped) if flipped >= MIN_FLIP_SHARE else (0, 1 - flipped)


def _classifier_pieces(crop: np.ndarray) -> list[np.ndarray]:
    """Up to `PIECES_PER_LINE` pieces of a line crop, each as wide as the classifier's input
    (4:1). Whole lines are squeezed to fit it, and a full-width line of prose squeezed sevenfold
    is called upside down as often as not."""
    height, width = crop.shape[:2]
    piece = CLASSIFIER_ASPECT * height
    if width <= piece:
        return [crop]
    starts = np.linspace(0, width - piece, PIECES_PER_LINE).astype(int)
    return [crop[:, start : start + piece] for start in starts]


def detect_pixel_orientation(ocr: Any, image: Image.Image) -> PixelOrientation:
    """The text's angle on a page image no engine has seen yet (for engines without their own
    check, such as DeepSeek-OCR), on a scaled copy cut to the ink: from the lines its
    projection profiles cut out when they are clear (`orientation_from_cut_lines`), else from
    a detection pass; then the line classifier (`bench/orientation.py` measures both)."""
    pixels = detector_pixels(image)
    found = orientation_from_cut_lines(ocr, pixels)
    return found if found is not None else orientation_from_detector(ocr, pixels)


def orientation_from_detector(ocr: Any, pixels: np.ndarray) -> PixelOrientation:
    """The text's angle from a detection pass over `pixels` (`detector_pixels`), then the line
    classifier; upright with no confidence when the detector finds no line."""
    boxes = _text_lines(ocr, pixels)
    if not boxes:
        return PixelOrientation(angle=0, confidence=0.0, lines=0)
    return orientation_from_boxes(ocr, pixels, boxes)


def orientation_from_cut_lines(ocr: Any, pixels: np.ndarray) -> PixelOrientation | None:
    """The text's angle from lines cut by projection profiles (`models.ink_cuts.xy_cut`), in
    a few milliseconds where the detector takes ~0.15 s; None when the cut is not clear-cut.

    The lines of a straight page leave empty rows between them, and (but for margins and
    gutters) no empty columns, so the gaps tell sideways text from level text; even CJK's
    grid-aligned glyphs leave narrower gaps between characters than between lines (counted
    strip by strip where a newspaper's columns or a table's rules leave no row empty across the
    page: `_line_axis`). Gaps that still do not say, a handful of words, or a classifier vote
    short of `CUT_MIN_AGREEMENT` (small type) give None, and the detector decides."""
    ink = pixels[:, :, 1] < INK_LEVEL
    is_sideways = _line_axis(ink)
    if is_sideways is None:
        return None
    view, view_ink = pixels, ink
    if is_sideways:  # counter-clockwise: text running downwards comes out upright
        view, view_ink = np.rot90(pixels), np.rot90(ink)
    lines = _cut_lines(view_ink)
    if len(lines) < CUT_MIN_LINES:
        return None
    longest = sorted(lines, key=lambda leaf: leaf[3] - leaf[2], reverse=True)[:SAMPLE_LINES]
    voted = longest[:CUT_FIRST_LINES]
    flipped, weight = _votes(ocr, [_line_crop(view, leaf) for leaf in voted])
    angle, agreement = _angle_from_vote(flipped / (weight or 1.0), is_sideways)
    if agreement < CUT_SURE_AGREEMENT:  # not unanimous: the other lines vote too
        rest = longest[CUT_FIRST_LINES:]
        more_flipped, more_weight = _votes(ocr, [_line_crop(view, leaf) for leaf in rest])
        flipped, weight, voted = flipped + more_flipped, weight + more_weight, longest
        angle, agreement = _angle_from_vote(flipped / (weight or 1.0), is_sideways)
    if agreement < CUT_MIN_AGREEMENT:
        return None
    return PixelOrientation(
        angle=angle, confidence=round(agreement, 3), lines=len(voted), method=CUT_LINES
    )


def _line_axis(ink: np.ndarray) -> bool | None:
    """Whether the lines run plumb (True) or level (False), None when the gaps do not say:
    from the whole page's rows and columns, else from those of its strips (`_strip_gap_share`).
    """
    for gap_share in (_gap_share, _strip_gap_share):
        level, sideways = gap_share(ink), gap_share(ink.T)
        if level >= CUT_MIN_GAP_SHARE and level >= CUT_AXIS_DOMINANCE * sideways:
            return False
        if sideways >= CUT_MIN_GAP_SHARE and sideways >= CUT_AXIS_DOMINANCE * level:
            return True
    return None


def _gap_share(ink: np.ndarray) -> float:
    """Share of the mask's rows with no more than a speck of ink: the gaps between lines."""
    return float((ink.sum(axis=1) <= SPECK_PX).mean())


def _strip_gap_share(ink: np.ndarray) -> float:
    """`_gap_share` within each of `CUT_GAP_STRIPS` strips side by side (from its first inked
    row to its last), the median: a newspaper's columns, whose lines do not line up, or a
    table's rules leave few rows empty across the page but many within a column."""
    shares = []
    for strip in np.array_split(ink, CUT_GAP_STRIPS, axis=1):
        inked = np.flatnonzero(strip.sum(axis=1) > SPECK_PX)
        if len(inked) > 1:
            shares.append(_gap_share(strip[inked[0] : inked[-1] + 1]))
    return float(np.median(shares)) if shares else 0.0


def _cut_lines(ink: np.ndarray) -> list[tuple[int, int, int, int]]:
    """XY-cut leaves (y0, y1, x0, x1) shaped like a line of text running left to right; where
    too few, those of the mask without its rules (a table's grid joins its cells into one)."""
    lines = _line_leaves(ink)
    return lines if len(lines) >= CUT_MIN_LINES else _line_leaves(ink & ~_rules(ink))


def _line_leaves(ink: np.ndarray) -> list[tuple[int, int, int, int]]:
    return [
        (y0, y1, x0, x1)
        for y0, y1, x0, x1 in xy_cut(ink, CUT_GUTTER_PX)
        if CUT_LINE_HEIGHT_PX[0] <= y1 - y0 <= CUT_LINE_HEIGHT_PX[1]
        and x1 - x0 >= CUT_LINE_ELONGATION * (y1 - y0)
    ]


def _rules(ink: np.ndarray) -> np.ndarray:
    """Ink in runs of `CUT_RULE_PX` either way. (A rule scanned askew and straightened comes
    out as dashes; bridging those took text with them and left the classifier's crops striped,
    so such a table goes to the detector.)"""
    return long_runs(ink, CUT_RULE_PX, axis=1) | long_runs(ink, CUT_RULE_PX, axis=0)


def _line_crop(pixels: np.ndarray, leaf: tuple[int, int, int, int]) -> np.ndarray:
    """A cut line with a margin of a third of its height (the classifier's vote is steadiest
    with it: `bench/orientation.py`)."""
    y0, y1, x0, x1 = leaf
    margin = max(1, (y1 - y0) // 3)
    return pixels[max(0, y0 - margin) : y1 + margin, max(0, x0 - margin) : x1 + margin]


def _flipped_share(ocr: Any, crops: list[np.ndarray]) -> float:
    """The classifier's confidence-weighted share of upside-down pieces of `crops`."""
    flipped, weight = _votes(ocr, crops)
    return flipped / (weight or 1.0)


def _votes(ocr: Any, crops: list[np.ndarray]) -> tuple[float, float]:
    """The classifier's confidence in the upside-down pieces of `crops`, and in all of them
    (votes of further crops add to both)."""
    pieces = [piece for crop in crops for piece in _classifier_pieces(crop)]
    if not pieces:
        return 0.0, 0.0
    _pieces, votes, _elapsed = ocr.text_cls(pieces)
    flipped = sum(float(score) for label, score in votes if label == "180")
    return flipped, sum(float(score) for _label, score in votes)


def detector_pixels(image: Image.Image) -> np.ndarray:
    """The page scaled to `DETECT_MIN_SIDE` on its short side, cut to its ink (margins and
    empty bands carry no lines: a third of a scan's pixels) and straightened, in OpenCV's
    channel order."""
    scale = DETECT_MIN_SIDE / min(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    pixels = np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR))
    return straightened(ink_box(pixels))[:, :, ::-1]


def straightened(pixels: np.ndarray) -> np.ndarray:
    """`pixels` `(H, W, 3)` turned so their lines run level (or plumb, on a page turned a
    quarter), and cut to the ink again: a sheet fed a degree or two askew has no empty rows
    between its lines, which the cut lines need, and the detector misreads sideways pages
    askew. Under `MIN_STRAIGHTEN_DEGREES` the pixels are left as they are."""
    ink = pixels[:, :, 1] < INK_LEVEL
    level = skew(ink, MAX_SKEW_DEGREES, sample=SKEW_SAMPLE_PIXELS)
    plumb = skew(ink.T, MAX_SKEW_DEGREES, sample=SKEW_SAMPLE_PIXELS)
    # PIL turns counter-clockwise: level lines running down to the right were turned clockwise,
    # plumb ones running down to the right counter-clockwise.
    degrees = level.degrees if level.gain >= plumb.gain else -plumb.degrees
    if abs(degrees) < MIN_STRAIGHTEN_DEGREES:
        return pixels
    turned = Image.fromarray(pixels).rotate(
        degrees, Image.Resampling.BILINEAR, expand=True, fillcolor=(255, 255, 255)
    )
    return ink_box(np.asarray(turned))


def ink_box(pixels: np.ndarray) -> np.ndarray:
    """`pixels` `(H, W, 3)` cut to the box around their ink, `INK_MARGIN` kept; unchanged when
    there is none."""
    ink = pixels[:, :, 1] < INK_LEVEL  # green: dark in black, blue and red ink alike
    rows = np.flatnonzero(ink.sum(axis=1) > SPECK_PX)
    columns = np.flatnonzero(ink.sum(axis=0) > SPECK_PX)
    if not len(rows) or not len(columns):
        return pixels
    top, bottom = max(0, rows[0] - INK_MARGIN), rows[-1] + INK_MARGIN + 1
    left, right = max(0, columns[0] - INK_MARGIN), columns[-1] + INK_MARGIN + 1
    return pixels[top:bottom, left:right]


def _text_lines(ocr: Any, pixels: np.ndarray) -> list[np.ndarray]:
    """The detector's line quads, top to bottom: what `ocr(pixels, use_det=True, use_rec=False)`
    returns for a page, without the crop of every line that call makes for its recogniser
    (on a dense page most of the call's time; only a dozen lines are classified here). The same
    boxes in the same order, except for a strip under 30 px high or over 8:1, which the call
    would pad first."""
    boxes, _elapsed = ocr.text_det(pixels)
    if boxes is None or len(boxes) == 0:
        return []
    return ocr.sorted_boxes(boxes)


@cache
def shared_detector() -> Any:
    """A RapidOCR (detector and line classifier only are used) for processes that render pages
    for another engine; built once per process, its models load in about a second."""
    from rapidocr_onnxruntime import RapidOCR

    return RapidOCR(
        use_cls=False,
        intra_op_num_threads=DETECTOR_THREADS,
        inter_op_num_threads=1,
        det_limit_type="max",  # the pixels' own size: `detector_pixels` scaled them already
    )
