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
import uuid
from dataclasses import dataclass
from typing import Any

from PIL import Image

from infra.db.ocr_queue import (
    DEFAULT_POLICY,
    ClaimedJob,
    JobOutcome,
    JobSpec,
    LeasePolicy,
    enqueue,
    is_lease_exhausted,
    raise_if_abandoned,
    wait_for_batch,
)
from infra.db.session import session_scope
from infra.errors import TransientError
from infra.vocabulary import Mode
from models.engine import Block, FinishReason, OcrRequest, OcrResult, PartialBatchError

# Lossless, and cheap at both ends: packbits TIFF encoded a 144-dpi scan in ~11 ms and decoded it
# in ~9 ms, where PNG (level 1) took 89 + 38 ms for 2x smaller bytes (one timing, same page).
# The decode runs on the GPU worker beside its decode loop, so it is the end that matters most.
IMAGE_FORMAT = "tiff"
QUEUE_ENGINE_NAME = "queue"
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
    "encode_image",
    "job_error",
    "job_to_request",
    "request_to_job",
    "result_from_dict",
    "result_to_dict",
]
