"""The OCR engine interface: what the pipeline hands an engine and what it gets back.

Engines are injected objects (a `Protocol`), so the pipeline never imports a concrete model and
tests can pass a scripted engine that loops or truncates on demand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from infra.errors import is_infrastructure
from infra.vocabulary import Mode

if TYPE_CHECKING:
    from PIL import Image


class FinishReason(StrEnum):
    EOS = "eos"
    LENGTH = "length"


@dataclass(frozen=True)
class Block:
    """One layout element of a page: a labelled region and its content.

    `boxes_bins` are the model's 0..999 normalised boxes; `boxes_page` the same boxes in page
    coordinates (PDF points for PDFs, pixels for images).
    """

    label: str
    text: str
    boxes_bins: list[list[int]] = field(default_factory=list)
    boxes_page: list[list[float]] = field(default_factory=list)


@dataclass(frozen=True)
class OcrRequest:
    """One page to recognise, rendered and routed.

    `page_width`/`page_height` are the page's own coordinate space (points), used to map boxes
    back to the page. `mode` is None for engines that have no modes (CPU OCR).
    """

    key: str
    image: Image.Image
    mode: Mode | None
    page_width: float
    page_height: float
    estimated_text_tokens: int | None = None
    max_new_tokens: int | None = None
    wire_image: bytes | None = None  # `image` already in the GPU queue's format (no re-encode)
    priority: float = 0.0  # queued engines serve lower values first


@dataclass
class OcrResult:
    """What an engine returns for one request. Token counts are None where an engine has none."""

    key: str
    markdown: str
    blocks: list[Block]
    raw_output: str
    finish_reason: FinishReason
    engine: str
    model_revision: str
    mode: Mode | None = None
    vision_tokens: int | None = None
    valid_vision_tokens: int | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    encode_ms: float | None = None
    decode_ms: float | None = None  # wall time from prefill to last token (batch-mates overlap)
    gpu_ms: float | None = None  # the page's share of the device time its batch steps took
    figures: list[tuple[Block, Image.Image]] = field(default_factory=list)


@runtime_checkable
class OcrEngine(Protocol):
    """Recognises a batch of pages. Batches may mix modes; results come back in request order."""

    name: str
    model_revision: str

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]: ...


class PartialBatchError(Exception):
    """An engine answered some pages of a batch and failed others (a GPU worker gave up on a
    few jobs): the answered pages keep their results, each failed one gets its own error."""

    def __init__(self, results: dict[str, OcrResult], errors: dict[str, Exception]) -> None:
        super().__init__(f"{len(errors)} of {len(results) + len(errors)} pages failed")
        self.results, self.errors = results, errors


def recognize_isolating_failures(
    engine: OcrEngine,
    requests: list[OcrRequest],
    on_finished: Callable[[OcrRequest, OcrResult | Exception], None],
    on_batch_error: Callable[[Exception, list[OcrRequest]], None] | None = None,
) -> None:
    """Recognises `requests`, reporting each page's result or error exactly once.

    A batch that raises is halved until the page that breaks the engine (or its memory) stands
    alone; only that page is reported with the error, the rest are recognised. An
    infrastructure error (no worker, database or network away) is not the pages' doing:
    halving would only repeat the wait, so every page of the batch gets it at once.
    """
    try:
        results = engine.recognize(requests)
    except PartialBatchError as partial:
        for request in requests:
            outcome = partial.results.get(request.key) or partial.errors.get(request.key)
            on_finished(request, outcome if outcome is not None else partial)
        return
    except Exception as error:
        if on_batch_error is not None:
            on_batch_error(error, requests)
        if len(requests) == 1 or is_infrastructure(error):
            for request in requests:
                on_finished(request, error)
            return
        half = len(requests) // 2
        recognize_isolating_failures(engine, requests[:half], on_finished, on_batch_error)
        recognize_isolating_failures(engine, requests[half:], on_finished, on_batch_error)
        return
    for request, result in zip(requests, results, strict=True):
        on_finished(request, result)
