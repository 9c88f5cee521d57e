"""Engines that decode a stream of pages: what a resident GPU worker drives.

A resident worker keeps its engine busy across claims: it prepares pages off the decode loop
(`prepare`: image decoding, views, prompt ids), hands them over through a `PageFeed` that the
engine polls whenever it has room (`serve`), and is told of each page the moment it finishes, so
its job is answered at once. Turning an output into an `OcrResult` (`result`) is CPU work too,
done by the worker off the decode loop.

`DeepseekOcrEngine` streams natively (continuous batching over a long-lived generator).
`BatchedStream` makes any other `OcrEngine` fit: it recognises whatever is ready, a batch at a
time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

from models.engine import OcrEngine, OcrRequest, OcrResult, recognize_isolating_failures

PageT = TypeVar("PageT")
OutputT = TypeVar("OutputT")


class PageFeed(Protocol[PageT]):
    """Where a running engine gets its next pages (polled whenever it has room)."""

    def take(self, limit: int, *, wait: bool) -> list[PageT] | None:
        """Up to `limit` pages ready now; with `wait`, block until one is (the engine has
        nothing else to do). None once the feed is closed and empty: no page will follow."""
        ...


@runtime_checkable
class StreamingEngine(Protocol[PageT, OutputT]):
    """An engine fed pages while it runs; see the module docstring for who calls what where."""

    name: str
    model_revision: str

    def prepare(self, request: OcrRequest) -> PageT: ...

    def serve(
        self, feed: PageFeed[PageT], on_finished: Callable[[PageT, OutputT | Exception], None]
    ) -> None:
        """Run pages from `feed` until it closes, reporting each page's output or error once."""
        ...

    def result(self, page: PageT, output: OutputT) -> OcrResult: ...


def is_out_of_memory(error: BaseException) -> bool:
    import torch  # only engines that run on a device raise it; keep this module torch-free

    return isinstance(error, torch.OutOfMemoryError)


def free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class BatchedStream:
    """Any `OcrEngine` as a streaming one: `recognize` on up to `max_batch` ready pages.

    A failing batch is halved until the failing page stands alone (then it alone is reported
    with its error). Out of memory also lowers the batch size to what failed; full batches win
    it back slowly.
    """

    engine: OcrEngine
    max_batch: int
    batch_limit: int = field(init=False)

    def __post_init__(self) -> None:
        self.batch_limit = self.max_batch

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def model_revision(self) -> str:
        return self.engine.model_revision

    def prepare(self, request: OcrRequest) -> OcrRequest:
        return request

    def serve(
        self,
        feed: PageFeed[OcrRequest],
        on_finished: Callable[[OcrRequest, OcrResult | Exception], None],
    ) -> None:
        while (requests := feed.take(self.batch_limit, wait=True)) is not None:
            if requests:
                self._recognize(requests, on_finished)
                self._grow_batch_limit(len(requests))

    def result(self, page: OcrRequest, output: OcrResult) -> OcrResult:
        return output

    def _recognize(
        self,
        requests: list[OcrRequest],
        on_finished: Callable[[OcrRequest, OcrResult | Exception], None],
    ) -> None:
        recognize_isolating_failures(self.engine, requests, on_finished, self._shrink_on_oom)

    def _shrink_on_oom(self, error: Exception, requests: list[OcrRequest]) -> None:
        if is_out_of_memory(error):
            free_device_memory()
            self.batch_limit = max(1, min(self.batch_limit, len(requests) // 2))

    def _grow_batch_limit(self, batch_size: int) -> None:
        """After an out-of-memory split, win the batch size back slowly on full batches."""
        if batch_size >= self.batch_limit < self.max_batch:
            self.batch_limit = min(self.max_batch, self.batch_limit + 1 + batch_size // 8)


__all__ = [
    "BatchedStream",
    "PageFeed",
    "StreamingEngine",
    "free_device_memory",
    "is_out_of_memory",
]
