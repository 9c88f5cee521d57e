"""The engine side of `bench.e2e_gpu`: random-weight DeepSeek-OCR pages that end at drawn
lengths, and the GPU worker process that serves them from the queue (the engine-alone run that
replays them is `bench.e2e_replay`).

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


def lognormal_mu() -> float:
    """mu of `--lengths lognormal`, whose mean exp(mu + sigma^2 / 2) is `LOGNORMAL_MEAN`."""
    return math.log(LOGNORMAL_MEAN) - LOGNORMAL_SIGMA**2 / 2


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

    def __post_init__(self) -> None:
        if self.low > self.high:  # a tiny output limit (the CPU smoke test): one length
            object.__setattr__(self, "low", self.high)

    def describe(self) -> dict[str, Any]:
        if self.kind == "estimate":
            what = (
                f"lognormal per page, median = the router's estimated text tokens of the page, "
                f"sigma {ESTIMATE_SIGMA}, clipped to [{self.low}, {self.high}]"
            )
        else:
            what = (
                f"lognormal, mean {LOGNORMAL_MEAN:.0f} (mu {lognormal_mu():.3f}, sigma "
                f"{LOGNORMAL_SIGMA}), clipped to [{self.low}, {self.high}]"
            )
        return {
            "kind": self.kind,
            "distribution": what,
            "seed": "sha256 of the rendered page (mode, size, every 4th pixel of every 4th row)",
            "ended": "at the drawn length in place of EOS (EOS ignored; random weights never "
            "emit it); reported as an EOS finish",
            **asdict(self),
        }

    def length(self, digest: str, estimated_tokens: int | None) -> int:
        """The output length of the page whose pixels have `digest` (`image_digest`)."""
        z = page_normal(digest)
        if self.kind == "estimate":
            value = max(estimated_tokens or 0, self.low) * math.exp(ESTIMATE_SIGMA * z)
        else:
            value = math.exp(lognormal_mu() + LOGNORMAL_SIGMA * z)
        return int(min(self.high, max(self.low, round(value))))


def image_digest(image: Image.Image) -> str:
    """SHA-256 of the page's mode, size and every 4th pixel of every 4th row (a nearest-neighbour
    quarter-size copy): tells rendered pages apart in under a millisecond, where hashing all
    the pixels took ~10 ms of the worker's feeder thread per page."""
    sample = image.resize((max(1, image.width // 4), max(1, image.height // 4)), Image.NEAREST)
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(sample.tobytes())
    return digest.hexdigest()


def page_normal(digest: str) -> float:
    """A standard normal draw fixed by a page digest."""
    bits = int(digest[:16], 16)
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
        self.pages = self.output_tokens = self.prepared = 0
        self.first_prepared: float | None = None  # time.time() the first claimed page was ready
        self.first_answer: float | None = None

    def prepare(self, request: OcrRequest):
        page = self.engine.prepare(request)
        self.first_prepared = self.first_prepared or time.time()
        self.prepared += 1
        digest = image_digest(request.image)
        drawn = self.lengths.length(digest, request.estimated_text_tokens)
        limit = min(drawn, request.max_new_tokens or drawn, self.engine.settings.max_new_tokens)
        fed = replace(page, max_new_tokens=limit)
        self._digests[id(fed)] = digest
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
        # Random weights decode to markup and noise that the validator rejects on every rung; a
        # real model's page is mostly accepted at once. The decode (its tokens and time) is
        # real; the transcript handed on is prose of the same length, so the pipeline's control
        # flow (accept, store) is what a real page would take.
        digest = self._digests.pop(id(page))
        result.markdown = result.raw_output = stand_in_text(digest, generation.output_tokens)
        result.blocks = []
        now = time.time()
        self.first_answer = self.first_answer or now
        self.pages += 1
        self.output_tokens += generation.output_tokens
        if self._served is not None:
            record = {
                "at": now,
                "digest": digest,
                "mode": str(page.inputs.mode),
                "tokens": generation.output_tokens,
            }
            self._served.write(json.dumps(record) + "\n")
        return result


STAND_IN_WORDS = tuple(
    sorted({word for sentence in ENGLISH_SENTENCES for word in sentence.split()})
)


def stand_in_text(digest: str, tokens: int) -> str:
    """Prose-like text of about `tokens` tokens, words drawn per page (no loops to reject)."""
    rng = random.Random(digest)
    return " ".join(rng.choice(STAND_IN_WORDS) for _ in range(tokens * 3 // 4))


class InstantEngine:
    """An `OcrEngine` that answers at once: prose-like text of each page's drawn length (words
    drawn per page, so the validator sees no loops), no model, no torch."""

    name, model_revision = "instant", "-"

    def __init__(self, lengths: LengthModel) -> None:
        self.lengths = lengths
        self.pages = 0
        self.first_answer: float | None = None  # time.time() of the first page answered

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]:
        self.first_answer = self.first_answer or time.time()
        self.pages += len(requests)
        results = []
        for request in requests:
            digest = image_digest(request.image)
            tokens = self.lengths.length(digest, request.estimated_text_tokens)
            text = stand_in_text(digest, tokens)
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
    from infra.settings import Settings
    from models.deepseek_ocr.config import DeepseekOcrConfig
    from models.deepseek_ocr.engine import DeepseekOcrEngine
    from models.deepseek_ocr.generation_types import GenerationSettings
    from models.deepseek_ocr.tokenizer import load_tokenizer

    config = DeepseekOcrConfig.tiny() if tiny else DeepseekOcrConfig()
    model = build_random_model(config, torch.device(device))
    if model.lm_head.weight.device.type == "cpu":
        model = model.float()
    worker_settings = Settings()  # OCRFLOW_OVERLAP_ENCODING, OCRFLOW_ADMIT_WAIT_SECONDS
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens,
        max_batch=max_batch,
        encode_thread=worker_settings.overlap_encoding,
        admit_wait_s=worker_settings.admit_wait_seconds,
    )
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
    from services.gpu_worker import GpuWorker, WorkerConfig, engine_slots, warm_up

    started = time.time()
    settings = Settings(
        database_url=args.database_url, device=args.device, max_new_tokens=args.max_new_tokens
    )
    ensure_schema(settings.database_url)
    lengths = LengthModel(args.lengths, high=args.max_tokens)
    graphs, graphs_seconds = 0, 0.0
    if args.engine == "instant":
        engine = forced = InstantEngine(lengths)
        slots = args.max_batch or settings.ocr_batch_size * 4
    else:
        engine = build_random_engine(
            tiny=args.tiny, device=args.device, max_new_tokens=args.max_new_tokens
        )
        slots = engine_slots(engine, args.max_batch, settings)
        built = time.time()
        graphs = warm_up(engine, settings)  # as `ocrflow gpu-worker` does before it serves
        graphs_seconds = time.time() - built
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
                    "graphs_captured_ahead": graphs,
                    "graph_capture_seconds": graphs_seconds,
                    "in_flight_limit": config.in_flight_limit,
                    "pages": getattr(forced, "pages", None),
                    "output_tokens": getattr(forced, "output_tokens", None),
                    "first_answer": getattr(forced, "first_answer", None),
                    # the instant engine prepares and answers a page in one call
                    "first_prepared": getattr(forced, "first_prepared", None)
                    or getattr(forced, "first_answer", None),
                    "held": held(),
                    "loop_seconds": loop_seconds(),
                    **(gpu_memory(args.device) if args.engine != "instant" else {}),
                },
            )
            if done.wait(STATS_EVERY_S):
                return

    held_timeline: list[tuple[float, int]] = []

    def held() -> list[tuple[float, int]]:
        """(seconds since ready, pages prepared and not yet answered: decoding or ready to be
        admitted): under the slots, the batch ran short of pages."""
        prepared = getattr(forced, "prepared", None)
        if prepared is not None and getattr(forced, "first_prepared", None):
            held_timeline.append((round(time.time() - ready, 1), prepared - forced.pages))
        return held_timeline

    loop_timeline: list[tuple[float, dict[str, float]]] = []

    def loop_seconds() -> list[tuple[float, dict[str, float]]]:
        """(seconds since ready, where the decode loop's time went so far: `Generator`'s
        `loop_seconds`, with its `admissions` as `admit_groups` and `admit_pages`, and `live`,
        the pages decoding now); the steps' share falling while pages are admitted or fed says
        the loop, not the GPU, set the pace, admit seconds per page against pages per group say
        whether small groups did, and `held` well above `live` that pages waited to be admitted."""
        generator = getattr(getattr(engine, "resident", None), "generator", None)
        if generator is not None:
            totals = {key: round(value, 3) for key, value in generator.loop_seconds.items()}
            totals |= {f"admit_{key}": count for key, count in generator.admissions.items()}
            totals["live"] = len(generator.live)
            loop_timeline.append((round(time.time() - ready, 1), totals))
        return loop_timeline

    reporter = threading.Thread(target=report, name="stats", daemon=True)
    reporter.start()
    print(
        f"worker ready: {slots} slots, {graphs} decode graphs captured, "
        f"{ready - started:.1f} s after start",
        flush=True,
    )
    try:
        return worker.run()
    finally:
        done.set()
        reporter.join()


__all__ = [
    "ForcedLengthEngine",
    "InstantEngine",
    "LengthModel",
    "build_random_engine",
    "image_digest",
    "run_worker",
]
