"""`QueueEngine`: the CPU side's `OcrEngine` that hands pages to the resident GPU workers.

`recognize` encodes each rendered page losslessly (PNG, so a queued page decodes to the same
pixels the in-process engine would see), enqueues the batch in the `ocr_job` table, waits for
the workers' answers and returns them in request order. The pipeline (`tasks/pages.py`) keeps
its validation and escalation unchanged: this engine is just another `OcrEngine`.

The wire format (`request_to_job`, `job_to_request`, `result_to_dict`, `result_from_dict`)
lives here too, so the worker and the CPU side can never disagree on it.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from typing import Any

from PIL import Image

from infra.db.ocr_queue import ClaimedJob, JobSpec, enqueue, wait_for_batch
from infra.db.session import session_scope
from infra.vocabulary import Mode
from models.engine import Block, FinishReason, OcrRequest, OcrResult

IMAGE_FORMAT = "png"
PNG_COMPRESS_LEVEL = 1  # lossless either way; level 1 encodes several times faster than 6
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
)


class OcrJobFailedError(RuntimeError):
    """A GPU worker gave up on pages of a batch; names each page and the worker's reason."""


def encode_image(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=IMAGE_FORMAT, compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def request_to_job(request: OcrRequest) -> JobSpec:
    return JobSpec(
        request_key=request.key,
        image=encode_image(request.image),
        image_format=IMAGE_FORMAT,
        page_width=request.page_width,
        page_height=request.page_height,
        mode=request.mode.value if request.mode else None,
        estimated_text_tokens=request.estimated_text_tokens,
        max_new_tokens=request.max_new_tokens,
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
        **{name: data[name] for name in _PLAIN_RESULT_FIELDS},
    )


@dataclass
class QueueEngine:
    """Recognises pages through the GPU work queue in `database_url`.

    `worker_grace_seconds`: how long to wait for a live worker before failing the batch (so an
    ingest with no GPU worker running fails its pages instead of hanging); `timeout` bounds the
    whole wait (None: wait while workers are alive).
    """

    database_url: str
    worker_grace_seconds: float = 120.0
    timeout: float | None = None
    poll_seconds: float = 0.2
    name: str = QUEUE_ENGINE_NAME
    model_revision: str = "gpu-worker"  # the real revision comes back on every result

    def recognize(self, requests: list[OcrRequest]) -> list[OcrResult]:
        if not requests:
            return []
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
        )
        failed = [f"{o.request_key}: {o.error}" for o in outcomes if o.result is None]
        if failed:
            raise OcrJobFailedError(f"GPU worker failed {len(failed)} page(s): {'; '.join(failed)}")
        results = {o.request_key: o.result for o in outcomes}
        return [result_from_dict(request.key, results[request.key]) for request in requests]


__all__ = [
    "IMAGE_FORMAT",
    "OcrJobFailedError",
    "QueueEngine",
    "encode_image",
    "job_to_request",
    "request_to_job",
    "result_from_dict",
    "result_to_dict",
]
