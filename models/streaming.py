"""Engines that decode a stream of pages: what a resident GPU worker drives.

A resident worker keeps its engine busy across claims: it prepares pages off the decode loop
(`prepare`: image decoding, views, prompt ids), hands them over through a `PageFeed` that the
engine polls whenever it has room (`serve`), and is told of each page the moment it finishes, so
its job is answered at once. Turning an output into an `OcrResult` (`result`) is CPU work too,
done by the worker off the decode loop.

`DeepseekOcrEngine` streams natively (continuous batching over a long-lived generator).
`BatchedStream` makes any other `OcrEngine` fit: it recognises whatever is ready, a batch at a
time. Both size their batches with one `AdaptiveBatchLimit`: halve on failure, win back slowly.
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
class AdaptiveBatchLimit:
    """How many pages may run at once after failures: halve on a failure, win back slowly.

    A failure of `failed` pages (out of memory, a step that raised) lowers the limit to the
    pages still running plus half of those that failed, so a retry of the same pages runs a
    smaller batch, and repeated failures narrow it down to one page. Each time as many pages as
    the limit have finished since the last change, it grows by one and an eighth, up to
    `maximum`: memory pressure is often brief (one long page), but growing back at once would
    fail the same way again.
    """

    maximum: int
    limit: int = field(init=False)
    finished_since_change: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.limit = self.maximum

    def shrink(self, failed: int, live: int = 0) -> None:
        """`failed` pages failed while `live` others go on running."""
        self.limit = max(1, min(self.limit, live + failed // 2))
        self.finished_since_change = 0

    def finished(self, pages: int = 1) -> None:
        """`pages` pages finished; win the limit back a step per limit's worth of them."""
        if self.limit >= self.maximum:
            return
        self.finished_since_change += pages
        if self.finished_since_change >= self.limit:
            self.limit = min(self.maximum, self.limit + 1 + self.limit // 8)
            self.finished_since_change = 0


@dataclass
class BatchedStream:
    """Any `OcrEngine` as a streaming one: `recognize` on up to `max_batch` ready pages.

    A failing batch is halved until the failing page stands alone (then it alone is reported
    with its error: `recognize_isolating_failures`). Out of memory also lowers the batch size
    for the batches that follow (`AdaptiveBatchLimit`).
    """

    engine: OcrEngine
    max_batch: int
    batch_limit: AdaptiveBatchLimit = field(init=False)

    def __post_init__(self) -> None:
        self.batch_limit = AdaptiveBatchLimit(self.max_batch)

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
        while (requests := feed.take(self.batch_limit.limit, wait=True)) is not None:
            if requests:
                recognize_isolating_failures(
                    self.engine, requests, on_finished, self._shrink_on_oom
                )
                self.batch_limit.finished(len(requests))

    def result(self, page: OcrRequest, output: OcrResult) -> OcrResult:
        return output

    def _shrink_on_oom(self, error: Exception, requests: list[OcrRequest]) -> None:
        if is_out_of_memory(error):
            free_device_memory()
            self.batch_limit.shrink(len(requests))


__all__ = [
    "AdaptiveBatchLimit",
    "BatchedStream",
    "PageFeed",
    "StreamingEngine",
    "free_device_memory",
    "is_out_of_memory",
]
