"""Route a page: `blank`, `text-layer`, or the cheapest DeepSeek-OCR mode that keeps precision.

The paper's central result drives the choice: precision depends on compression, text tokens per
valid vision token (`tasks.precision`). Each mode, cheapest first, is priced for the page as it
will be rendered (`models.deepseek_ocr.geometry`, counted like the official `test_compress`);
the first whose expected precision meets the target and at whose resolution the type stays
legible wins. Layouts the paper shows single-view modes failing on go straight to Gundam: tables,
newspapers (Table 4: newspaper edit distance 0.12 with Gundam, 0.35-0.94 without), two-column
pages with real text, and pages denser than books and reports.

Modes are priced for the engine's model family (`EngineCapabilities.family`): v1's five views,
or DeepSeek-OCR 2's budgets, where the same ladder caps the local crops of its 256-token global
view (Tiny: none; Small to Large: at most 2, 3, 4; Gundam: the official 6). Rungs that give a
page the same budget (an A4 page gets 2 crops under every cap from 2 to 5) are priced once.

Routing is engine-aware (`models.capabilities`): a trustworthy text layer that would lose
something (table structure, formulas) goes to OCR only when the configured engine can represent
what it lacks and would not lose what the layer has (a script, characters outside the engine's
alphabet). Modes are planned for every OCR page whatever the engine, so token accounting is the
same on every install; reasons name the engine they were planned for.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any

from infra.settings import RoutingPolicy
from infra.vocabulary import Mode, Route
from models.capabilities import DEEPSEEK_OCR, EngineCapabilities, family_vision_tokens
from models.deepseek_ocr2.family import ModelFamily
from tasks.estimate import TokenEstimate, estimate_text_tokens
from tasks.features import PageFeatures
from tasks.precision import expected_precision

DEFAULT_RENDER_DPI = 144  # the official PDF script's rendering; settings.render_dpi
# A two-column page with fewer tokens than this is sparse (a list, a form), not an article.
SPARSE_TOKENS = 300
# Books and reports have < 1000 text tokens a page (paper §4.3); newspapers 4-5k need Gundam.
DENSE_TOKENS = 2000
# Smallest em height (pixels, in the mode's input view) the model reads reliably: body text on
# the Fox pages was ~6 px at Tiny and read at 96%; below ~5 px glyphs fall apart.
MIN_EM_PX = 5.5
LINE_INK_HEIGHT_EM = 0.93  # a text line's ink, ascender to descender, in ems
# What a text layer cannot represent: table structure, text inside images, formulas.
TEXT_LAYER_MAX_COLUMNS = 2
TEXT_LAYER_MAX_IMAGE_COVERAGE = 0.3
TEXT_LAYER_MAX_MATH_RATIO = 0.02
# Character classes whose loss changes what a text says: letters, digits, symbols (`ß`, `€`,
# `∅`); punctuation variants (`–` read as `-`) do not count as a loss.
CONTENT_CATEGORIES = ("L", "N", "S")
MAX_LISTED_CHARACTERS = 6


@dataclass(frozen=True)
class RouteDecision:
    """A page's route and the numbers behind it.

    `vision_tokens` are the chosen mode's valid vision tokens (0 without OCR) for the page
    rendered at `image_size` pixels, priced for the model `family`; `expected_*` are None
    without OCR.
    """

    route: Route
    mode: Mode | None
    est_text_tokens: int
    vision_tokens: int
    expected_compression: float | None
    expected_precision: float | None
    reason: str
    image_size: tuple[int, int]
    family: str = ModelFamily.DEEPSEEK_OCR.value  # whose budgets priced the modes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def vision_tokens_in(self, mode: Mode) -> int:
        """Valid vision tokens of this page in `mode`, for the family it was planned for (an
        escalation compares budgets with it)."""
        return vision_tokens_for(mode, self.image_size, self.family)


def rendered_size(width: float, height: float, render_dpi: float) -> tuple[int, int]:
    """Pixel size of a `width` x `height` pt page rendered at `render_dpi`."""
    zoom = render_dpi / 72
    return max(1, math.ceil(width * zoom)), max(1, math.ceil(height * zoom))


def vision_tokens_for(
    mode: Mode, image_size: tuple[int, int], family: str = ModelFamily.DEEPSEEK_OCR.value
) -> int:
    """Valid vision tokens of `mode` for an image of `image_size` pixels (v1's by default)."""
    return family_vision_tokens(family, mode, *image_size, valid=True)


def em_px(mode: Mode, font_size: float, width: float, height: float,
          image_size: tuple[int, int], engine: EngineCapabilities = DEEPSEEK_OCR,
          ) -> float:  # fmt: skip
    """How many pixels an em of `font_size` pt type spans in the finest view `mode` feeds the
    model (`engine.view_canvas`: tiles resized to their canvas, or one square view)."""
    canvas = engine.view_canvas(mode, *image_size)
    return font_size * min(canvas[0] / width, canvas[1] / height)


def _font_size(features: PageFeatures) -> float:
    """Body font size in points, from the text layer or else the pixels' line height."""
    if features.has_trustworthy_text and features.font_size > 0:
        return features.font_size
    pixels = features.pixels
    if pixels is not None and pixels.dpi > 0 and pixels.line_height_px > 0:
        return pixels.line_height_px / pixels.dpi * 72 / LINE_INK_HEIGHT_EM
    return 0.0


def _layout_flags(features: PageFeatures, estimate: TokenEstimate) -> list[str]:
    """Why a page is too complex for a single-view mode (empty: it is not)."""
    pixels = features.pixels
    text_columns = features.columns if features.has_trustworthy_text else 0
    columns = max(text_columns, pixels.columns if pixels else 0)
    flags = []
    if features.table_like or (pixels is not None and pixels.looks_tabular):
        flags.append("tabular")
    elif columns >= 3:
        flags.append(f"newspaper-like ({columns} columns)")
    elif columns == 2 and estimate.tokens >= SPARSE_TOKENS:
        flags.append("two columns")
    if estimate.tokens >= DENSE_TOKENS:
        flags.append(f"dense ({estimate.tokens} tokens)")
    return flags


def _text_layer_shortfalls(
    features: PageFeatures, engine: EngineCapabilities
) -> tuple[list[str], list[str]]:
    """What a trustworthy text layer would still lose on this page: (what `engine` would
    recover, what it cannot represent either)."""
    recovered: list[str] = []
    beyond: list[str] = []
    if features.table_like:
        (recovered if engine.tables else beyond).append("table structure")
    elif features.columns > TEXT_LAYER_MAX_COLUMNS:
        columns = f"reading order of {features.columns} columns"
        (recovered if engine.multi_column_order else beyond).append(columns)
    if features.image_coverage >= TEXT_LAYER_MAX_IMAGE_COVERAGE:
        recovered.append(f"text in images ({features.image_coverage:.0%} of the page)")
    if features.math_ratio >= TEXT_LAYER_MAX_MATH_RATIO:
        (recovered if engine.formulas else beyond).append("formulas")
    return recovered, beyond


def ocr_losses(features: PageFeatures, engine: EngineCapabilities) -> list[str]:
    """What OCR on `engine` would lose of a page's text layer: scripts it does not read and
    characters it cannot emit."""
    losses = [
        f"{script} script ({count} characters)"
        for script, count in sorted(features.script_chars.items())
        if script not in engine.scripts
    ]
    content = "".join(
        char for char in features.layer_chars
        if unicodedata.category(char)[0] in CONTENT_CATEGORIES
    )  # fmt: skip
    missing = sorted(engine.unsupported_characters(content))
    if missing:
        listed = " ".join(missing[:MAX_LISTED_CHARACTERS])
        more = (
            f" and {len(missing) - MAX_LISTED_CHARACTERS} more"
            if len(missing) > MAX_LISTED_CHARACTERS
            else ""
        )
        losses.append(f"characters it cannot emit ({listed}{more})")
    return losses


def _source(estimate: TokenEstimate, features: PageFeatures) -> str:
    if estimate.source == "text-layer":
        return "from the text layer"
    why = features.distrust_reason or "images on the page"
    return f"from pixels ({why})"


def _priced(
    mode: Mode, tokens: int, image_size: tuple[int, int], engine: EngineCapabilities
) -> tuple[int, float, float]:
    vision = engine.vision_tokens(mode, *image_size)
    compression = tokens / vision
    return vision, compression, expected_precision(compression)


def _ocr_decision(
    features: PageFeatures, estimate: TokenEstimate, width: float, height: float,
    image_size: tuple[int, int], precision_target: float, preamble: str,
    engine: EngineCapabilities,
) -> RouteDecision:  # fmt: skip
    tokens = estimate.tokens
    flags = _layout_flags(features, estimate)
    font_size = _font_size(features)
    skipped: list[str] = []
    if flags:
        mode, why = Mode.GUNDAM, ", ".join(flags)
    else:
        mode, why = Mode.GUNDAM, f"no mode reaches {precision_target:.0%}; the largest"
        priced: set[tuple[int, tuple[int, int]]] = set()
        for candidate in Mode:
            vision, compression, precision = _priced(candidate, tokens, image_size, engine)
            canvas = engine.view_canvas(candidate, *image_size)
            if engine.family is ModelFamily.DEEPSEEK_OCR_2 and (vision, canvas) in priced:
                continue  # the same budget as a cheaper rung, already rejected
            priced.add((vision, canvas))
            em = em_px(candidate, font_size, width, height, image_size, engine)
            if font_size and em < MIN_EM_PX:
                skipped.append(f"{candidate}: {font_size:.0f} pt type is {em:.1f} px")
            elif precision < precision_target:
                skipped.append(f"{candidate}: {compression:.1f}x, {precision:.0%}")
            else:
                mode, why = candidate, "the cheapest mode that meets the target"
                break
    vision, compression, precision = _priced(mode, tokens, image_size, engine)
    reason = (
        f"{_engine_prefix(engine)}{preamble}{_budget(engine, mode, image_size)}: {why}; "
        f"{tokens} tokens "
        f"{_source(estimate, features)} / {vision} vision tokens = {compression:.1f}x, "
        f"expected precision {precision:.0%}"
    )
    if skipped:
        reason += f" (rejected {'; '.join(skipped)})"
    return RouteDecision(
        route=Route.OCR,
        mode=mode,
        est_text_tokens=tokens,
        vision_tokens=vision,
        expected_compression=round(compression, 2),
        expected_precision=round(precision, 4),
        reason=reason,
        image_size=image_size,
        family=engine.family.value,
    )


def _budget(engine: EngineCapabilities, mode: Mode, image_size: tuple[int, int]) -> str:
    """The mode as the reason names it; for OCR-2 with the views it stands for."""
    if engine.family is not ModelFamily.DEEPSEEK_OCR_2:
        return str(mode)
    crops = engine.crops(mode, *image_size)
    return f"{mode} (global view + {crops} crops)" if crops else f"{mode} (global view only)"


def _engine_prefix(engine: EngineCapabilities) -> str:
    """Who the decision was planned for; engines without modes get the mode for accounting."""
    if engine.has_modes:
        return f"[{engine.name}] "
    return f"[{engine.name}; mode planned for token accounting] "


def route_page(
    features: PageFeatures,
    width: float,
    height: float,
    *,
    policy: RoutingPolicy = RoutingPolicy.AUTO,
    precision_target: float = 0.95,
    render_dpi: float = DEFAULT_RENDER_DPI,
    mode_override: Mode | None = None,
    engine: EngineCapabilities,
) -> RouteDecision:
    """Decide how to read a `width` x `height` pt page that will be rendered at `render_dpi`.

    With `always-ocr` every non-blank page gets an OCR mode; with `auto` a trustworthy text layer
    is used as is unless `engine` (the one the page will be read with) recovers what the layer lacks
    without losing what it has. `mode_override` sends every non-blank page to OCR in that mode
    (a run's explicit choice).
    """
    image_size = rendered_size(width, height, render_dpi)
    estimate = estimate_text_tokens(features)
    pixels = features.pixels
    family = engine.family.value
    if not features.has_trustworthy_text and (pixels is None or pixels.blank):
        return RouteDecision(
            Route.BLANK, None, 0, 0, None, None, "no text and no ink", image_size, family
        )
    if mode_override is not None:
        vision, compression, precision = _priced(mode_override, estimate.tokens, image_size, engine)
        reason = (
            f"{_engine_prefix(engine)}{_budget(engine, mode_override, image_size)}: forced for "
            f"this run; {estimate.tokens} tokens / {vision} vision tokens = {compression:.1f}x, "
            f"expected precision {precision:.0%}"
        )
        return RouteDecision(
            Route.OCR, mode_override, estimate.tokens, vision, round(compression, 2),
            round(precision, 4), reason, image_size, family,
        )  # fmt: skip
    preamble = ""
    if features.has_trustworthy_text:
        if policy == RoutingPolicy.ALWAYS_OCR:
            preamble = "policy always-ocr; "
        else:
            kept = _text_layer_verdict(features, engine, estimate)
            if kept is not None:
                return RouteDecision(
                    Route.TEXT_LAYER, None, estimate.tokens, 0, None, None, kept, image_size,
                    family,
                )  # fmt: skip
            recovered, _ = _text_layer_shortfalls(features, engine)
            preamble = f"text layer would lose {', '.join(recovered)}; "
    return _ocr_decision(
        features, estimate, width, height, image_size, precision_target, preamble, engine
    )


def _text_layer_verdict(
    features: PageFeatures, engine: EngineCapabilities, estimate: TokenEstimate
) -> str | None:
    """Why the trustworthy text layer is kept (its route reason), or None to OCR the page."""
    recovered, beyond = _text_layer_shortfalls(features, engine)
    layer = f"trustworthy text layer ({estimate.tokens} tokens, {features.columns} column(s))"
    if not recovered and not beyond:
        return f"[{engine.name}] {layer} and nothing it cannot represent (tables, images, formulas)"
    if beyond:  # formulas would be garbled; structure the layer lacks would be lacking still
        return f"[{engine.name}] {layer} kept: {engine.name} cannot represent {', '.join(beyond)}"
    losses = ocr_losses(features, engine)
    if losses:
        return f"[{engine.name}] {layer} kept: OCR on {engine.name} would lose {'; '.join(losses)}"
    return None
