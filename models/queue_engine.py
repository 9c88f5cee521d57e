"""`QueueEngine`: the CPU side's `OcrEngine` that hands pages to the resident GPU workers.

`recognize` encodes each rendered page losslessly (packbits TIFF, so a queued page decodes to the
same pixels the in-process engine would see), enqueues the batch in the `ocr_job` table, waits for
the workers' answers and returns them in request order. The pipeline (`tasks/pages.py`) keeps
its validation and escalation unchanged: this engine is just another `OcrEngine`.

What can go wrong is told apart for the pipeline: no live worker (or no answer in time) is
`EngineUnavailable`, raised once for the whole batch after one grace period, and at once for
later batches until a worker beats again; a worker failing some pages is a `PartialBatchError`
that keeps the other pages' results.

The wire format (`request_to_job`, `job_to_request`, `result_to_dict`, `result_from_dict`)
lives here too, so the worker and the CPU side can never disagree on it.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from infra.db.ocr_queue import (
    DEFAULT_POLICY,
    ClaimedJob,
    JobOutcome,
    JobSpec,
    LeasePolicy,
    cancel_quietly,
    collect_finished,
    enqueue,
    is_lease_exhausted,
    live_workers,
    mark_abandoned,
    raise_if_abandoned,
    reclaim_stale,
    wait_for_batch,
)
from infra.db.session import session_scope
from infra.errors import EngineUnavailable, TransientError
from infra.vocabulary import Mode
from models.engine import Block, FinishReason, OcrRequest, OcrResult, PartialBatchError

# Lossless, and cheap at both ends: packbits TIFF encoded a 144-dpi scan in ~11 ms and decoded it
# in ~9 ms, where PNG (level 1) took 89 + 38 ms for 2x smaller bytes (one timing, same page).
# The decode runs on the GPU worker beside its decode loop, so it is the end that matters most.
IMAGE_FORMAT = "tiff"
QUEUE_ENGINE_NAME = "queue"
logger = logging.getLogger(__name__)
# Scalar fields of OcrResult copied as they are (enums and blocks are converted explicitly).
_PLAIN_RESULT_FIELDS = (
    "markdown",
    "raw_output",
    "engine",
    "model_revision",
    "vision_tokens",
    "valid_vision_tokens",
    "prompt_tokens",
    "output_tokens",
    "encode_ms",
    "decode_ms",
    "gpu_ms",
)


class OcrJobFailedError(RuntimeError):
    """A GPU worker failed a page; the message is the worker's reason (the engine's error)."""


class OcrJobLostError(TransientError):
    """A page's worker died on every claim of it (killed, out of host memory): the page is not
    known to be bad, so it is worth another try later."""


def encode_image(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=IMAGE_FORMAT, compression="packbits")
    return buffer.getvalue()


def request_to_job(request: OcrRequest) -> JobSpec:
    return JobSpec(
        request_key=request.key,
        image=request.wire_image or encode_image(request.image),
        image_format=IMAGE_FORMAT,
        page_width=request.page_width,
        page_height=request.page_height,
        mode=request.mode.value if request.mode else None,
        estimated_text_tokens=request.estimated_text_tokens,
        max_new_tokens=request.max_new_tokens,
        priority=request.priority,
    )


def job_to_request(job: ClaimedJob) -> OcrRequest:
    """The worker's view of a claimed job; its key is the job id, so answers map back."""
    spec = job.spec
    image = Image.open(io.BytesIO(spec.image))
    image.load()
    return OcrRequest(
        key=str(job.id),
        image=image,
        mode=Mode(spec.mode) if spec.mode else None,
        page_width=spec.page_width,
        page_height=spec.page_height,
        estimated_text_tokens=spec.estimated_text_tokens,
        max_new_tokens=spec.max_new_tokens,
    )


def result_to_dict(result: OcrResult) -> dict[str, Any]:
    """JSON-ready form of a result, without its key (the job row has it) and figure crops
    (the pipeline crops figures from the source page itself)."""
    data = {name: getattr(result, name) for name in _PLAIN_RESULT_FIELDS}
    data["finish_reason"] = result.finish_reason.value
    data["mode"] = result.mode.value if result.mode else None
    data["blocks"] = [
        {
            "label": block.label,
            "text": block.text,
            "boxes_bins": block.boxes_bins,
            "boxes_page": block.boxes_page,
        }
        for block in result.blocks
    ]
    return data


def result_from_dict(key: str, data: dict[str, Any]) -> OcrResult:
    return OcrResult(
        key=key,
        blocks=[Block(**block) for block in data["blocks"]],
        finish_reason=FinishReason(data["finish_reason"]),
        mode=Mode(data["mode"]) if data["mode"] else None,
        **{name: data.get(name) for name in _PLAIN_RESULT_FIELDS},  # older workers lack some
    )


@dataclass
class QueueEngine:
    """Recognises pages through the GPU work queue in `database_url`.

    `worker_grace_seconds`: how long a batch waits for a live worker before its pages are
    handed back as retryable (so an ingest with no GPU worker running does not hang);
    `timeout` bounds the whole wait (None: wait while workers are alive); `policy`: the
    queue's lease and heartbeat intervals, for judging workers alive and reclaiming dead
    ones' pages while waiting.
    """

    database_url: str
    worker_grace_seconds: float = 120.0
    timeout: float | None = None
    poll_seconds: float = 0.2
    policy: LeasePolicy = DEFAULT_POLICY
    name: str = QUEUE_ENGINE_NAME
    model_revision: str = "gpu-worker"  # the real revision comes back on every result

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]:
        """Results in request order; raises `EngineUnavailable` for the whole batch when no
        worker serves the queue, `PartialBatchError` when workers failed some of its pages."""
        if not requests:
            return []
        raise_if_abandoned(self.database_url)  # before encoding and writing every page
        batch_id = str(uuid.uuid4())
        jobs = [request_to_job(request) for request in requests]
        with session_scope(self.database_url) as session:
            enqueue(session=session, batch_id=batch_id, jobs=jobs)
        outcomes = wait_for_batch(
            database_url=self.database_url,
            batch_id=batch_id,
            worker_grace_seconds=self.worker_grace_seconds,
            timeout=self.timeout,
            poll_seconds=self.poll_seconds,
            policy=self.policy,
        )
        by_key = {outcome.request_key: outcome for outcome in outcomes}
        results = {
            key: result_from_dict(key, outcome.result)
            for key, outcome in by_key.items()
            if outcome.result is not None
        }
        errors = {
            key: job_error(outcome) for key, outcome in by_key.items() if outcome.result is None
        }
        if errors:
            raise PartialBatchError(results, errors)
        return [results[request.key] for request in requests]

    def stream(self) -> QueueStream:
        """A stream of pages through the queue, answered one by one (`QueueStream`)."""
        return QueueStream(self)


Answer = tuple[OcrRequest, OcrResult | Exception]


class QueueStream:
    """One caller's pages in the queue, answered page by page rather than as a batch.

    `add` enqueues pages at any time (escalations go back with the pixels they came with);
    `take` returns the answers that have arrived. A page's answer is its result or the error
    that ended it: the worker's failure, `EngineUnavailable` when no worker served the queue
    for the engine's grace (remembered, so later pages fail at once until a worker beats), or
    the database's error when it stayed away for a heartbeat interval. The polling is the
    process's `_Collector`: one query per poll for every stream on the database, however many
    windows are in flight.
    """

    def __init__(self, engine: QueueEngine) -> None:
        self.engine = engine
        self.batch_id = str(uuid.uuid4())
        self.waiting_since = time.monotonic()  # when the oldest unanswered page was added
        self._changed = threading.Condition()
        self._outstanding: dict[str, OcrRequest] = {}
        self._answers: list[Answer] = []
        self._woken = False  # `wake` was called since the last `take`
        self._collector = _collector_for(engine)

    @property
    def outstanding(self) -> int:
        """Pages whose answer the caller has not taken yet."""
        with self._changed:
            return len(self._outstanding) + len(self._answers)

    @property
    def queued(self) -> int:
        """Pages still in the queue (not answered there yet)."""
        with self._changed:
            return len(self._outstanding)

    @property
    def waiting_answers(self) -> int:
        """Answers that arrived and the caller has not taken yet."""
        with self._changed:
            return len(self._answers)

    def add(self, requests: list[OcrRequest]) -> None:
        """Enqueue pages, their keys unique among the unanswered ones; a queue that cannot take
        them (no worker since a give-up, the database away) answers them with its error."""
        if not requests:
            return
        with self._changed:
            if not self._outstanding:
                self.waiting_since = time.monotonic()
            self._outstanding.update((request.key, request) for request in requests)
        try:
            raise_if_abandoned(self.engine.database_url)
            jobs = [request_to_job(request) for request in requests]
            with session_scope(self.engine.database_url) as session:
                enqueue(session=session, batch_id=self.batch_id, jobs=jobs)
        except Exception as error:
            self._end([request.key for request in requests], error)
            return
        self._collector.watch(self)

    def take(self, timeout: float) -> list[Answer]:
        """The answers that arrived since the last call, waiting up to `timeout` for one (or
        for `wake`)."""
        with self._changed:
            if not self._answers and self._outstanding and not self._woken:
                self._changed.wait(timeout)
            answers, self._answers, self._woken = self._answers, [], False
        return answers

    def wake(self) -> None:
        """End a `take` waiting now, or make the next one return at once: the caller has other
        work that came in (a chunk of pages rendered), so it need not poll for it."""
        with self._changed:
            self._woken = True
            self._changed.notify_all()

    def close(self) -> None:
        """Stop watching; pages still queued are deleted (nobody wants their answers)."""
        self._collector.forget(self)
        if self.queued:
            cancel_quietly(self.engine.database_url, self.batch_id)

    def answered(self, outcomes: Iterable[JobOutcome]) -> None:
        """The collector's delivery of this stream's finished jobs."""
        with self._changed:
            for outcome in outcomes:
                request = self._outstanding.pop(outcome.request_key, None)
                if request is not None:  # else given up on already
                    self._answers.append((request, _answer_of(request, outcome)))
            self._changed.notify_all()

    def give_up(self, error: Exception) -> None:
        """Every unanswered page ends with `error`; their jobs are deleted."""
        with self._changed:
            keys = list(self._outstanding)
        if keys:
            cancel_quietly(self.engine.database_url, self.batch_id)
            self._end(keys, error)

    def _end(self, keys: list[str], error: Exception) -> None:
        with self._changed:
            for key in keys:
                if (request := self._outstanding.pop(key, None)) is not None:
                    self._answers.append((request, error))
            self._changed.notify_all()


def _answer_of(request: OcrRequest, outcome: JobOutcome) -> OcrResult | Exception:
    if outcome.result is None:
        return job_error(outcome)
    try:
        return result_from_dict(request.key, outcome.result)
    except Exception as error:  # a worker of another version: this page fails, not the stream
        return OcrJobFailedError(f"page {request.key}: unreadable result: {error!r}")


@dataclass
class _Collector:
    """Polls the queue on behalf of every stream of one database and polling policy in this
    process: collects finished jobs, notices when no worker is alive, reclaims dead workers'
    pages. A thread per database, started with the first stream, idle while no page waits."""

    database_url: str
    poll_seconds: float
    policy: LeasePolicy
    last_worker_seen: float = field(default_factory=time.monotonic)
    _streams: dict[str, QueueStream] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _woken: threading.Event = field(default_factory=threading.Event)
    _failing_since: float | None = None

    def __post_init__(self) -> None:
        threading.Thread(target=self._run, name="queue-collector", daemon=True).start()

    def watch(self, stream: QueueStream) -> None:
        with self._lock:
            if not self._streams:
                self.last_worker_seen = time.monotonic()  # idle until now: nothing to judge by
            self._streams[stream.batch_id] = stream
        self._woken.set()

    def forget(self, stream: QueueStream) -> None:
        with self._lock:
            self._streams.pop(stream.batch_id, None)

    def _run(self) -> None:
        next_reclaim = 0.0
        while True:
            with self._lock:
                streams = {key: s for key, s in self._streams.items() if s.queued}
            if not streams:  # woken by the next `watch`
                self._woken.wait()
                self._woken.clear()
                continue
            arrived = False
            try:
                if time.monotonic() >= next_reclaim:
                    self._reclaim()
                    next_reclaim = time.monotonic() + self.policy.heartbeat_seconds
                arrived = self._poll(streams)
                self._failing_since = None
            except Exception as error:
                self._database_error(streams, error)
            try:
                self._judge_grace(streams)
            except Exception:  # the thread must outlive anything: every stream waits on it
                logger.exception("judging the OCR queue's grace failed")
            time.sleep(self.poll_seconds / 10 if arrived else self.poll_seconds)

    def _reclaim(self) -> None:
        with session_scope(self.database_url) as session:
            reclaim_stale(
                session=session,
                max_attempts=self.policy.max_attempts,
                stale_after_seconds=self.policy.stale_after_seconds,
            )

    def _poll(self, streams: dict[str, QueueStream]) -> bool:
        """Hands each stream its finished jobs; True when any arrived."""
        with session_scope(self.database_url) as session:
            finished = collect_finished(session=session, batch_ids=streams.keys())
            if finished or live_workers(
                session=session, within_seconds=self.policy.stale_after_seconds
            ):
                self.last_worker_seen = time.monotonic()
        by_batch: dict[str, list[JobOutcome]] = {}
        for batch_id, outcome in finished:
            by_batch.setdefault(batch_id, []).append(outcome)
        for batch_id, outcomes in by_batch.items():
            streams[batch_id].answered(outcomes)
        return bool(finished)

    def _database_error(self, streams: dict[str, QueueStream], error: Exception) -> None:
        """A blip is polled through; a database away for a heartbeat interval ends every
        unanswered page with its error (the pipeline postpones them)."""
        logger.warning("polling the OCR queue failed: %s", error)
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        if now - self._failing_since >= self.policy.heartbeat_seconds:
            for stream in streams.values():
                stream.give_up(error)

    def _judge_grace(self, streams: dict[str, QueueStream]) -> None:
        """Gives up the streams that waited their engine's grace without a live worker, or
        longer than its timeout."""
        now = time.monotonic()
        for stream in streams.values():
            if not stream.queued:
                continue
            engine = stream.engine
            silent = now - max(stream.waiting_since, self.last_worker_seen)
            if silent > engine.worker_grace_seconds:
                mark_abandoned(self.database_url)
                stream.give_up(
                    EngineUnavailable(
                        f"OCR batch {stream.batch_id} abandoned: no live GPU worker for "
                        f"{silent:.0f} s"
                    )
                )
            elif engine.timeout is not None and now - stream.waiting_since > engine.timeout:
                stream.give_up(
                    EngineUnavailable(
                        f"OCR batch {stream.batch_id} abandoned: not answered within "
                        f"{engine.timeout:.0f} s"
                    )
                )


_collectors: dict[tuple[str, float, LeasePolicy], _Collector] = {}
_collectors_lock = threading.Lock()


def _collector_for(engine: QueueEngine) -> _Collector:
    key = (engine.database_url, engine.poll_seconds, engine.policy)
    with _collectors_lock:
        if key not in _collectors:
            _collectors[key] = _Collector(*key)
        return _collectors[key]


def job_error(outcome: JobOutcome) -> Exception:
    """The error a failed job stands for: lost to worker deaths (transient) or failed by the
    worker's engine (its reason)."""
    reason = outcome.error or "no reason recorded"
    if is_lease_exhausted(outcome.error):
        return OcrJobLostError(f"page {outcome.request_key}: {reason}")
    return OcrJobFailedError(f"page {outcome.request_key}: {reason}")


__all__ = [
    "IMAGE_FORMAT",
    "OcrJobFailedError",
    "OcrJobLostError",
    "QueueEngine",
    "QueueStream",
    "encode_image",
    "job_error",
    "job_to_request",
    "request_to_job",
    "result_from_dict",
    "result_to_dict",
]
