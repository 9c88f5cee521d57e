"""The engine side of `bench.e2e_gpu`: random-weight DeepSeek-OCR pages that end at drawn
lengths, the GPU worker process that serves them from the queue, and the engine-alone run.

Random weights never emit EOS, so every page's output ends at a length drawn for it
(`LengthModel`), deterministically from the page's pixels: the worker and the engine-alone run
draw the same length for the same rendered page. `ForcedLengthEngine` wraps the real
`DeepseekOcrEngine`: `prepare` sets the page's `max_new_tokens` to its drawn length (EOS
ignored) and `result` reports a page that reached it as ended by EOS, which is what the drawn
length stands for; the pipeline's validator then judges the output as it would a real one.

`InstantEngine` (`--engine instant`) answers every page at once with plain text of its drawn
length and no model at all: the pipeline's own ceiling, and a check of the whole environment
on a machine without torch.

    python -m bench.e2e_gpu worker --database-url URL --device cuda --stats FILE --served FILE
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

from PIL import Image

from bench.corpus_text import ENGLISH_SENTENCES
from models.engine import FinishReason, OcrRequest, OcrResult

MIN_TOKENS, MAX_TOKENS = 32, 3500
ESTIMATE_SIGMA = 0.35  # spread of a page's output around the router's estimate of its text
LOGNORMAL_MEAN, LOGNORMAL_SIGMA = 700.0, 0.8  # --lengths lognormal: mean 700, median ~510
STATS_EVERY_S = 1.0


@dataclass(frozen=True)
class LengthModel:
    """Where each page's output ends, drawn from a hash of its rendered pixels.

    `estimate` (default): lognormal around the page's own estimated text tokens (the router's
    estimate, carried with the page to the worker), median = the estimate, sigma
    `ESTIMATE_SIGMA`, so dense pages give long outputs and slides short ones, as real pages do,
    and the validator's far-too-short check is not tripped by the draw. `lognormal`: one
    distribution for every page, mean `LOGNORMAL_MEAN`, sigma `LOGNORMAL_SIGMA`, whatever the
    page holds. Both are clipped to [`low`, `high`].
    """

    kind: str = "estimate"
    low: int = MIN_TOKENS
    high: int = MAX_TOKENS

    def describe(self) -> dict[str, Any]:
        if self.kind == "estimate":
            what = (
                f"lognormal per page, median = the router's estimated text tokens of the page, "
                f"sigma {ESTIMATE_SIGMA}, clipped to [{self.low}, {self.high}]"
            )
        else:
            what = (
                f"lognormal, mean {LOGNORMAL_MEAN:.0f} (mu {self._mu():.3f}, sigma "
                f"{LOGNORMAL_SIGMA}), clipped to [{self.low}, {self.high}]"
            )
        return {
            "kind": self.kind,
            "distribution": what,
            "seed": "sha256 of the rendered page's pixels (mode, size, bytes)",
            "ended": "at the drawn length in place of EOS (EOS ignored; random weights never "
            "emit it); reported as an EOS finish",
            **asdict(self),
        }

    @staticmethod
    def _mu() -> float:
        return math.log(LOGNORMAL_MEAN) - LOGNORMAL_SIGMA**2 / 2

    def length(self, image: Image.Image, estimated_tokens: int | None) -> int:
        z = page_normal(image)
        if self.kind == "estimate":
            value = max(estimated_tokens or 0, self.low) * math.exp(ESTIMATE_SIGMA * z)
        else:
            value = math.exp(self._mu() + LOGNORMAL_SIGMA * z)
        return int(min(self.high, max(self.low, round(value))))


def image_digest(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def page_normal(image: Image.Image) -> float:
    """A standard normal draw fixed by the page's pixels."""
    bits = int(image_digest(image)[:16], 16)
    return NormalDist().inv_cdf((bits + 0.5) / 2**64)


class ForcedLengthEngine:
    """A `DeepseekOcrEngine` whose pages end at their drawn length (see the module docstring).
    `served`, if given, gets one JSON line per finished page (time, digest, mode, tokens)."""

    def __init__(self, engine, lengths: LengthModel, served: Path | None = None) -> None:
        self.engine = engine
        engine.settings = replace(engine.settings, ignore_eos=True)
        self.lengths = lengths
        self.name, self.model_revision = engine.name, engine.model_revision
        self._served = served.open("a", buffering=1) if served is not None else None
        self._digests: dict[int, str] = {}
        self.pages = self.output_tokens = 0
        self.first_answer: float | None = None

    def prepare(self, request: OcrRequest):
        page = self.engine.prepare(request)
        drawn = self.lengths.length(request.image, request.estimated_text_tokens)
        limit = min(drawn, request.max_new_tokens or drawn, self.engine.settings.max_new_tokens)
        fed = replace(page, max_new_tokens=limit)
        if self._served is not None:
            self._digests[id(fed)] = image_digest(request.image)
        return fed

    def serve(self, feed, on_finished: Callable[[Any, Any], None]) -> None:
        self.engine.serve(feed, on_finished)

    def result(self, page, generation):
        if (
            generation.finish_reason is FinishReason.LENGTH
            and page.max_new_tokens is not None
            and generation.output_tokens >= page.max_new_tokens
            and page.max_new_tokens < self.engine.settings.max_new_tokens
        ):
            generation.finish_reason = FinishReason.EOS  # the drawn end stands for the EOS
        result = self.engine.result(page, generation)
        now = time.time()
        self.first_answer = self.first_answer or now
        self.pages += 1
        self.output_tokens += generation.output_tokens
        if self._served is not None:
            record = {
                "at": now,
                "digest": self._digests.pop(id(page), None),
                "mode": str(page.inputs.mode),
                "tokens": generation.output_tokens,
            }
            self._served.write(json.dumps(record) + "\n")
        return result


class InstantEngine:
    """An `OcrEngine` that answers at once: prose-like text of each page's drawn length (words
    drawn per page, so the validator sees no loops), no model, no torch."""

    name, model_revision = "instant", "-"
    words = tuple(sorted({word for sentence in ENGLISH_SENTENCES for word in sentence.split()}))

    def __init__(self, lengths: LengthModel) -> None:
        self.lengths = lengths

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]:
        results = []
        for request in requests:
            tokens = self.lengths.length(request.image, request.estimated_text_tokens)
            rng = random.Random(image_digest(request.image))
            text = " ".join(rng.choice(self.words) for _ in range(tokens * 3 // 4))  # fmt: skip
            results.append(
                OcrResult(
                    key=request.key,
                    markdown=text,
                    blocks=[],
                    raw_output=text,
                    finish_reason=FinishReason.EOS,
                    engine=self.name,
                    model_revision=self.model_revision,
                    mode=request.mode,
                    output_tokens=tokens,
                )
            )
        return results


def build_random_engine(*, tiny: bool, device: str, max_new_tokens: int, max_batch: int = 64):
    """The real `DeepseekOcrEngine` over the full-size architecture (or the tiny test config)
    with random weights (bf16 on GPU, fp32 on CPU), as `bench/model_gpu.py` builds it."""
    import torch

    from bench.model_gpu import build_random_model
    from models.deepseek_ocr.config import DeepseekOcrConfig
    from models.deepseek_ocr.engine import DeepseekOcrEngine
    from models.deepseek_ocr.generation_types import GenerationSettings
    from models.deepseek_ocr.tokenizer import load_tokenizer

    config = DeepseekOcrConfig.tiny() if tiny else DeepseekOcrConfig()
    model = build_random_model(config, torch.device(device))
    if model.lm_head.weight.device.type == "cpu":
        model = model.float()
    settings = GenerationSettings(max_new_tokens=max_new_tokens, max_batch=max_batch)
    revision = f"random-{'tiny' if tiny else 'full'}-{next(model.parameters()).dtype}"
    return DeepseekOcrEngine(model, load_tokenizer(), model_revision=revision, settings=settings)


def gpu_memory(device: str) -> dict[str, float | None]:
    import torch

    if not device.startswith("cuda"):
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
    }


def write_json(path: Path, data: dict) -> None:
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(data))
    partial.replace(path)


def run_worker(args) -> int:
    """The GPU worker process: `services.gpu_worker.GpuWorker` serving the queue with the
    forced-length engine, sized like `ocrflow gpu-worker` (`engine_slots`). Writes its state
    (ready, slots, pages, peak GPU memory) to `args.stats` every second."""
    from infra.db.migrate import ensure_schema
    from infra.db.ocr_queue import LeasePolicy, WorkerInfo
    from infra.settings import Settings
    from services.gpu_worker import GpuWorker, WorkerConfig, engine_slots

    started = time.time()
    settings = Settings(
        database_url=args.database_url, device=args.device, max_new_tokens=args.max_new_tokens
    )
    ensure_schema(settings.database_url)
    lengths = LengthModel(args.lengths, high=args.max_tokens)
    if args.engine == "instant":
        engine = forced = InstantEngine(lengths)
        slots = args.max_batch or settings.ocr_batch_size * 4
    else:
        engine = build_random_engine(
            tiny=args.tiny, device=args.device, max_new_tokens=args.max_new_tokens
        )
        slots = engine_slots(engine, args.max_batch, settings)
        forced = ForcedLengthEngine(engine, lengths, args.served)
    info = WorkerInfo(
        device=args.device, engine=engine.name, model_revision=engine.model_revision, capacity=slots
    )
    config = WorkerConfig(
        database_url=settings.database_url,
        max_batch=slots,
        policy=LeasePolicy.from_settings(settings),
    )
    worker = GpuWorker(forced, info, config)
    signals: list[int] = []

    def stop(signum, _frame) -> None:  # first signal: finish what is held; second: now
        signals.append(signum)
        if len(signals) > 1:
            raise KeyboardInterrupt
        worker.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ready = time.time()
    done = threading.Event()

    def report() -> None:
        while True:
            write_json(
                args.stats,
                {
                    "pid": os.getpid(),
                    "ready": True,
                    "started": started,
                    "ready_at": ready,
                    "slots": slots,
                    "in_flight_limit": config.in_flight_limit,
                    "pages": getattr(forced, "pages", None),
                    "output_tokens": getattr(forced, "output_tokens", None),
                    "first_answer": getattr(forced, "first_answer", None),
                    **(gpu_memory(args.device) if args.engine != "instant" else {}),
                },
            )
            if done.wait(STATS_EVERY_S):
                return

    reporter = threading.Thread(target=report, name="stats", daemon=True)
    reporter.start()
    print(f"worker ready: {slots} slots, model built in {ready - started:.1f} s", flush=True)
    try:
        return worker.run()
    finally:
        done.set()
        reporter.join()


class ReplayFeed:
    """The engine-alone run's `PageFeed`: a pool of threads decodes and prepares pages ahead of
    the decode loop, never more than `ahead` at once (as the worker's in-flight limit)."""

    def __init__(
        self,
        engine: ForcedLengthEngine,
        requests: list[Callable[[], OcrRequest]],
        ahead: int,
        threads: int,
    ) -> None:
        self.engine, self.total = engine, len(requests)
        self._todo: queue.Queue = queue.Queue()
        for index, make in enumerate(requests):
            self._todo.put((index, make))
        self._ready: queue.Queue = queue.Queue()
        self._room = threading.Semaphore(ahead)
        self.taken = 0
        self.starved_waits = 0  # times the decode loop had room but no prepared page
        self.error: BaseException | None = None
        self._workers = [
            threading.Thread(target=self._prepare, name=f"prepare-{n}", daemon=True)
            for n in range(threads)
        ]
        for thread in self._workers:
            thread.start()

    def _prepare(self) -> None:
        while True:
            try:
                _index, make = self._todo.get_nowait()
            except queue.Empty:
                return
            self._room.acquire()
            try:
                self._ready.put(self.engine.prepare(make()))
            except BaseException as error:  # surfaces in `take`
                self.error = error
                self._ready.put(None)

    def wait_ready(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._ready.qsize() < min(count, self.total) and time.monotonic() < deadline:
            time.sleep(0.05)

    def finished(self) -> None:
        self._room.release()

    def take(self, limit: int, *, wait: bool) -> list | None:
        if self.taken >= self.total:
            return None
        pages = []
        if wait or self._ready.empty():
            if self._ready.empty():
                self.starved_waits += 1
            if wait:
                pages.append(self._ready.get())
        while len(pages) < limit and not self._ready.empty():
            pages.append(self._ready.get_nowait())
        if any(page is None for page in pages):
            raise RuntimeError("preparing a page failed") from self.error
        self.taken += len(pages)
        return pages


class TimeUp(Exception):
    """Raised out of the decode loop when the engine-alone run reaches its deadline."""


def run_engine_alone(
    engine: ForcedLengthEngine,
    requests: list[Callable[[], OcrRequest]],
    *,
    ahead: int,
    threads: int,
    deadline: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The same pages through the engine's streaming decode loop in this process (no Prefect,
    no Postgres), fed by `ReplayFeed`; times from the first decode call to the last page."""
    feed = ReplayFeed(engine, requests, ahead=ahead, threads=threads)
    feed.wait_ready(ahead, timeout=120)
    finished: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []

    def on_finished(page, outcome) -> None:
        feed.finished()
        finished.append(time.time())
        if isinstance(outcome, Exception):
            errors.append(f"{type(outcome).__name__}: {outcome}")
            return
        tokens.append(outcome.output_tokens)  # no `result`: the worker builds it off the loop
        if len(finished) % 250 == 0:
            log(f"engine alone: {len(finished)}/{feed.total} pages")
        if time.time() > deadline:
            raise TimeUp  # the rate then counts the pages finished by now, like a cut pipeline

    started = time.time()
    try:
        engine.serve(feed, on_finished)
    except TimeUp:
        log(f"engine alone: time budget reached after {len(finished)}/{feed.total} pages")
    ended = max(finished, default=started)
    return {
        "pages": len(tokens),
        "failed": len(errors),
        "errors": errors[:5],
        "seconds": ended - started,
        "started": started,
        "ended": ended,
        "first_page_seconds": (min(finished) - started) if finished else None,
        "output_tokens": sum(tokens),
        "starved_waits": feed.starved_waits,
        "complete": len(finished) >= feed.total,
    }


__all__ = [
    "ForcedLengthEngine",
    "InstantEngine",
    "LengthModel",
    "ReplayFeed",
    "build_random_engine",
    "image_digest",
    "run_engine_alone",
    "run_worker",
]
