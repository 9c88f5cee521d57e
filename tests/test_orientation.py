"""Pages turned 90, 180 or 270 degrees (by the PDF's /Rotate, by the text layer's direction,
or in a scan's pixels) are detected, the angle is reported, and OCR reads them upright, on the
real RapidOCR engine. The documents are made here."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pymupdf
import pytest
from PIL import Image

from bench.e2e_corpus import PAGE_BUILDERS, scan
from bench.routing_corpus import TYPEFACES
from infra.settings import Settings
from models.engine import OcrRequest, OcrResult
from models.orientation import (
    CUT_LINES,
    CUT_MIN_GAP_SHARE,
    DETECTOR,
    INK_LEVEL,
    _gap_share,
    _line_axis,
    _text_lines,
    detect_pixel_orientation,
    detector_pixels,
    orientation_from_cut_lines,
    orientation_from_detector,
    shared_detector,
)
from models.rapidocr_engine import RapidOcrEngine, RapidOcrTuning
from tasks.orientation import PageOrientation, with_engine_rotation
from tasks.split import SourcePage, open_document

SENTENCE = "The parish registers of Saint Mary were copied in the winter of 1871."
TEXT = " ".join([SENTENCE] * 6)
PAGE = pymupdf.Rect(0, 0, 612, 792)
TEXT_BOX = pymupdf.Rect(72, 72, 540, 400)
TEXT_BOX_SIDEWAYS = pymupdf.Rect(72, 72, 400, 720)  # room for lines running up or down


def born_digital(path: Path, *, page_rotate: int = 0, text_rotate: int = 0) -> Path:
    """A one-page PDF with prose; `text_rotate` turns the text counter-clockwise on the page,
    `page_rotate` sets /Rotate (the viewer turns the page clockwise)."""
    doc = pymupdf.open()
    page = doc.new_page(width=PAGE.width, height=PAGE.height)
    box = TEXT_BOX_SIDEWAYS if text_rotate in (90, 270) else TEXT_BOX
    assert page.insert_textbox(box, TEXT, fontsize=13, rotate=text_rotate) >= 0
    page.set_rotation(page_rotate)
    doc.save(path)
    return path


def scanned(path: Path, *, clockwise: int) -> Path:
    """An image-only PDF page: the born-digital page rendered at 150 dpi, its pixels turned
    `clockwise` degrees (a sheet fed sideways or upside down), wrapped as the page's image."""
    source = pymupdf.open(born_digital(path.with_suffix(".src.pdf")))
    pixmap = source[0].get_pixmap(dpi=150)
    image = Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)
    image = image.rotate(-clockwise, expand=True)  # PIL turns counter-clockwise
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    doc = pymupdf.open()
    page = doc.new_page(width=image.width * 72 / 150, height=image.height * 72 / 150)
    page.insert_image(page.rect, stream=buffer.getvalue())
    doc.save(path)
    return path


def first_page(path: Path, settings: Settings) -> tuple[SourcePage, Image.Image]:
    """The page and its render at the pipeline's DPI (the document is closed afterwards)."""
    with open_document(path, settings) as document:
        page = next(document.iter_pages())
        return page, page.render(settings.render_dpi)


def recognise(engine: RapidOcrEngine, page: SourcePage, image: Image.Image) -> OcrResult:
    request = OcrRequest("1", image, None, page_width=page.width, page_height=page.height)
    [result] = engine.recognize([request])
    return result


def words(text: str) -> set[str]:
    return {word.strip(".,").lower() for word in text.split()}


def reads_the_sentence(result: OcrResult) -> bool:
    """Most of the sentence's words came back (an upside-down read gives none of them)."""
    expected = words(SENTENCE)
    return len(expected & words(result.markdown)) >= 0.8 * len(expected)


# --- /Rotate and the text layer's direction: detected from the PDF, rendered upright ------------


@pytest.mark.parametrize(
    ("page_rotate", "text_rotate", "angle"),
    [
        (0, 0, 0),
        (90, 0, 90),
        (180, 0, 180),
        (270, 0, 270),
        (0, 90, 270),  # text turned counter-clockwise reads bottom to top
        (0, 180, 180),
        (0, 270, 90),
        (90, 90, 0),  # /Rotate puts text drawn sideways back upright
    ],
)
def test_rotate_and_text_direction_give_the_pages_angle(
    tmp_path: Path, settings: Settings, page_rotate: int, text_rotate: int, angle: int
) -> None:
    path = born_digital(tmp_path / "p.pdf", page_rotate=page_rotate, text_rotate=text_rotate)
    page, image = first_page(path, settings)
    assert page.orientation.angle == angle == page.rotation
    assert page.orientation.page_rotate == page_rotate
    assert page.orientation.to_dict()["source"] == "text-layer"
    portrait = image.height > image.width
    assert portrait == (text_rotate in (0, 180)), "the render has the upright page's shape"
    width, height = page.upright_size
    assert (height > width) == portrait


def test_rotated_pages_render_exactly_like_the_upright_page(
    tmp_path: Path, settings: Settings
) -> None:
    _, upright = first_page(born_digital(tmp_path / "upright.pdf"), settings)
    reference = np.asarray(upright.convert("L"), dtype=np.int16)
    for page_rotate in (90, 180, 270):
        path = born_digital(tmp_path / f"r{page_rotate}.pdf", page_rotate=page_rotate)
        page, image = first_page(path, settings)
        assert image.size == upright.size
        assert page.render_size(settings.render_dpi).width_px == upright.width
        difference = np.abs(np.asarray(image.convert("L"), dtype=np.int16) - reference)
        assert difference.mean() < 1.0, f"/Rotate {page_rotate}: rendered turned"


def test_an_image_page_without_text_counts_as_upright_until_its_pixels_are_read(
    tmp_path: Path, settings: Settings
) -> None:
    page, _image = first_page(scanned(tmp_path / "scan.pdf", clockwise=180), settings)
    assert page.orientation.angle == 0 and page.orientation.source == "none"


@pytest.mark.parametrize(
    ("page_rotate", "text_rotate"),  # text direction's angle: the first test, without OCR
    [(270, 0), pytest.param(0, 180, marks=pytest.mark.slow)],
)
def test_ocr_reads_a_page_turned_by_rotate_or_text_direction(
    tmp_path: Path, settings: Settings, rapidocr: RapidOcrEngine, page_rotate: int, text_rotate: int
) -> None:
    path = born_digital(tmp_path / "p.pdf", page_rotate=page_rotate, text_rotate=text_rotate)
    page, image = first_page(path, settings)
    result = recognise(rapidocr, page, image)
    assert reads_the_sentence(result), result.markdown
    assert json.loads(result.raw_output)["rotation"] == 0  # the render was already upright


# --- pixels: a scan fed sideways or upside down -------------------------------------------------


@pytest.mark.parametrize(  # 270 found in the pixels without OCR: the test after this one
    "clockwise", [90, 180, pytest.param(270, marks=pytest.mark.slow)]
)
def test_ocr_turns_a_rotated_scan_upright_and_reports_the_angle(
    tmp_path: Path, settings: Settings, rapidocr: RapidOcrEngine, clockwise: int
) -> None:
    page, image = first_page(scanned(tmp_path / "scan.pdf", clockwise=clockwise), settings)
    result = recognise(rapidocr, page, image)
    assert reads_the_sentence(result), result.markdown
    assert json.loads(result.raw_output)["rotation"] == clockwise
    # boxes are in the upright page's points: the first line sits near the top left
    [[x0, y0, x1, y1]] = result.blocks[0].boxes_page
    assert x0 < 100 and y0 < 100 and x1 <= 612 + 1 and y1 <= 792 + 1


@pytest.mark.parametrize("clockwise", [0, 90, 180, 270])
def test_pixel_orientation_for_engines_without_their_own_check(
    tmp_path: Path, settings: Settings, rapidocr: RapidOcrEngine, clockwise: int
) -> None:
    _page, image = first_page(scanned(tmp_path / "scan.pdf", clockwise=clockwise), settings)
    orientation = detect_pixel_orientation(rapidocr.session(), image)
    assert orientation.angle == clockwise and orientation.lines >= 3
    assert orientation.method == CUT_LINES  # a straight page of prose: no detection pass
    turned = orientation.upright(image)
    assert turned.height > turned.width  # the letter page stands upright again


@pytest.mark.parametrize("clockwise", [0, 90, 180, 270])
def test_the_detector_pass_finds_the_angle_on_its_own(
    tmp_path: Path, settings: Settings, rapidocr: RapidOcrEngine, clockwise: int
) -> None:
    """The fallback for pages whose lines projection profiles cannot cut out."""
    _page, image = first_page(scanned(tmp_path / "scan.pdf", clockwise=clockwise), settings)
    found = orientation_from_detector(rapidocr.session(), detector_pixels(image))
    assert found.angle == clockwise and found.method == DETECTOR


@pytest.mark.parametrize("clockwise", [0, 90, 180, 270])
def test_a_scan_fed_askew_is_straightened_before_its_lines_are_cut(
    tmp_path: Path, settings: Settings, rapidocr: RapidOcrEngine, clockwise: int
) -> None:
    """Three degrees askew, no row between the lines is empty until the page is straightened."""
    _page, image = first_page(scanned(tmp_path / "scan.pdf", clockwise=clockwise), settings)
    skewed = image.rotate(3, expand=True, fillcolor="white")
    found = detect_pixel_orientation(rapidocr.session(), skewed)
    assert found.angle == clockwise and found.method == CUT_LINES


@pytest.mark.parametrize("clockwise", [0, 180])
def test_lines_without_gaps_between_them_are_left_to_the_detector(
    tmp_path: Path, settings: Settings, rapidocr: RapidOcrEngine, clockwise: int
) -> None:
    """A grid's rules cross every gap between the lines (a ruled table): the cut finds no
    empty rows, so it decides nothing, and the detector finds the angle."""
    source = pymupdf.open(born_digital(tmp_path / "table.pdf"))
    for x in (70, 230, 390, 545):
        source[0].draw_line((x, 60), (x, 420), width=1.5)
    source.save(tmp_path / "ruled.pdf")
    pixmap = pymupdf.open(tmp_path / "ruled.pdf")[0].get_pixmap(dpi=150)
    image = Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)
    image = image.rotate(-clockwise, expand=True)
    ocr = rapidocr.session()
    assert orientation_from_cut_lines(ocr, detector_pixels(image)) is None
    found = detect_pixel_orientation(ocr, image)
    assert found.angle == clockwise and found.method == DETECTOR


@pytest.mark.parametrize("kind", ["table", "newspaper"])
@pytest.mark.parametrize("clockwise", [0, 90, 180, 270])
def test_columns_and_ruled_tables_are_cut_strip_by_strip(kind: str, clockwise: int) -> None:
    """A newspaper's columns do not line their lines up and a table's rules cross every gap,
    so no row is empty across the whole page either way; within strips side by side the gaps
    between lines show again, and a table's lines are cut once its rules are taken out. (A
    newspaper's small type often leaves the classifier's vote short: then the detector decides,
    which must still be right.)"""
    rng = random.Random(f"orientation-0-{kind}-latin")  # as `bench/orientation.py` builds it
    source = pymupdf.open()
    PAGE_BUILDERS[kind](source, TYPEFACES["latin"], rng)
    pixmap = scan(source[0], rng)[0].get_pixmap(dpi=144, colorspace=pymupdf.csRGB, alpha=False)
    image = Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)
    image = image.rotate(-clockwise, expand=True)
    ink = detector_pixels(image)[:, :, 1] < INK_LEVEL
    assert max(_gap_share(ink), _gap_share(ink.T)) < CUT_MIN_GAP_SHARE  # the page: no verdict
    assert _line_axis(ink) is (clockwise in (90, 270))  # the strips: lines level or plumb
    found = detect_pixel_orientation(shared_detector(), image)  # as the CPU workers run it
    assert found.angle == clockwise
    if kind == "table":
        assert found.method == CUT_LINES


def test_the_pixel_check_sees_the_lines_rapidocrs_whole_call_finds(
    tmp_path: Path, settings: Settings, rapidocr: RapidOcrEngine
) -> None:
    """The check runs the detector alone (not RapidOCR's whole call, which also cuts out every
    line for its recogniser); it must see the same lines in the same order."""
    _page, image = first_page(scanned(tmp_path / "scan.pdf", clockwise=90), settings)
    scale = 960 / max(image.size)  # as the check downscales it
    small = image.resize((round(image.width * scale), round(image.height * scale)))
    pixels = np.asarray(small.convert("RGB"))[:, :, ::-1]
    ocr = rapidocr.session()
    whole_call, _timings = ocr(pixels, use_det=True, use_cls=False, use_rec=False)
    lines = _text_lines(ocr, pixels)
    assert len(lines) == len(whole_call) >= 6
    assert np.allclose(np.asarray(lines, np.float32), np.asarray(whole_call, np.float32))


@pytest.mark.parametrize("clockwise", [90, 180])
def test_a_rotated_scan_renders_upright_for_engines_without_their_own_check(
    tmp_path: Path, settings: Settings, clockwise: int
) -> None:
    _, upright = first_page(scanned(tmp_path / "upright.pdf", clockwise=0), settings)
    with open_document(scanned(tmp_path / "scan.pdf", clockwise=clockwise), settings) as document:
        page = next(document.iter_pages())
        image = page.render(settings.render_dpi, check_pixels=True)
        assert page.orientation.to_dict() | {"confidence": 1.0} == {
            "angle": clockwise, "source": "pixels", "page_rotate": 0, "confidence": 1.0,
        }  # fmt: skip
        again = page.render(settings.render_dpi)  # now upright straight from the pixmap
    for render in (image, again):
        assert abs(render.width - upright.width) <= 1 and abs(render.height - upright.height) <= 1
        render = render.resize(upright.size).convert("L")
        difference = np.abs(
            np.asarray(render, np.int16) - np.asarray(upright.convert("L"), np.int16)
        )
        assert difference.mean() < 3.0


def test_the_engines_turn_adds_to_the_planned_angle_in_the_stored_orientation() -> None:
    planned = PageOrientation(angle=90, source="text-layer", page_rotate=90).to_dict()
    turned = json.dumps({"rotation": 180, "rotation_confidence": 0.9, "lines": []})
    assert with_engine_rotation(planned, turned) == {
        "angle": 270, "source": "pixels", "page_rotate": 90, "confidence": 0.9,
    }  # fmt: skip
    assert with_engine_rotation(None, turned)["angle"] == 180
    not_turned = json.dumps({"rotation": 0, "lines": []})
    assert with_engine_rotation(planned, not_turned) == planned
    assert with_engine_rotation(planned, "plain markdown from another engine") == planned


def test_a_poor_reading_is_retried_the_other_way_up(tmp_path: Path, settings: Settings) -> None:
    """The safety net behind the line classifier: with it off, an upside-down scan reads as
    noise, most lines are dropped, and the page is read again turned over."""
    engine = RapidOcrEngine(RapidOcrTuning(classify_direction=False))
    page, image = first_page(scanned(tmp_path / "scan.pdf", clockwise=180), settings)
    result = recognise(engine, page, image)
    assert reads_the_sentence(result), result.markdown
    assert json.loads(result.raw_output)["rotation"] == 180


def test_the_pipeline_stores_the_planned_and_the_engines_angle(
    tmp_path: Path, settings: Settings, rapidocr: RapidOcrEngine
) -> None:
    """Through the page pipeline: a /Rotate page's angle comes from the plan; a scan fed
    upside down gets its angle from the engine that turned it. Both land in the page's
    stored features."""
    from tasks.pages import plan_pages, recognize_pages

    rotated = born_digital(tmp_path / "rotate.pdf", page_rotate=90)
    [plan] = plan_pages(rotated, settings, [1])
    assert plan.features["orientation"]["angle"] == 90

    upside_down = scanned(tmp_path / "upside-down.pdf", clockwise=180)
    [record] = recognize_pages(
        upside_down, settings, plan_pages(upside_down, settings, [1]), rapidocr
    )
    stored = record.fields["features"]["orientation"]
    assert (stored["angle"], stored["source"]) == (180, "pixels")
    markdown = record.attempts[-1].result_fields["markdown"]
    assert len(words(SENTENCE) & words(markdown)) >= 0.8 * len(words(SENTENCE))


def test_scans_are_turned_by_their_pixels_for_an_engine_that_cannot_turn_them(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """DeepSeek-OCR reads what it is given: a scan fed sideways is turned upright before it,
    and the angle found in the pixels is stored with the page."""
    from models.deepseek_ocr.engine import DeepseekOcrEngine
    from tasks.pages import plan_pages, recognize_pages

    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'unused.db'}",
        data_dir=tmp_path,
        engine="deepseek",
        model_path=tiny_checkpoint,
        max_new_tokens=4,
    )
    engine = DeepseekOcrEngine.from_checkpoint(tiny_checkpoint, max_new_tokens=4, max_batch=2)
    sideways = scanned(tmp_path / "sideways.pdf", clockwise=90)
    [record] = recognize_pages(sideways, settings, plan_pages(sideways, settings, [1]), engine)
    stored = record.fields["features"]["orientation"]
    assert (stored["angle"], stored["source"]) == (90, "pixels")
