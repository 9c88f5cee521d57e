"""S3 event intake: an SQS poller and an HTTP receiver feeding the registry and Prefect.

For every notification: parse it (any envelope, see `tasks.s3_events`), reconcile each named
key with S3 into the registry, then emit one Prefect event per object change. Registering
*before* emitting is what makes the debounced trigger safe: by the time the triggered
`ingest-s3-objects` run starts, every change in its window is already waiting in the registry.

Malformed notifications are rejected (HTTP 400; deleted from SQS, they can never become
valid), counted, and emitted as `ocrflow.s3.event.rejected`; the receiver keeps running.
Failures to reach S3 or the database are not the sender's fault: HTTP 503 and the SQS message
stays for redelivery.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prefect.events import emit_event

from infra.s3 import S3Location, sqs_client
from infra.settings import Settings
from tasks.results_s3 import is_results_key
from tasks.s3_events import MalformedEvent, ObjectChange, parse_notification
from tasks.s3_reconcile import reconcile_keys

logger = logging.getLogger("ocrflow.events")

EVENT_PREFIX = "ocrflow.s3.object"  # + ".created" / ".removed"
REJECTED_EVENT = "ocrflow.s3.event.rejected"
BUCKET_LABEL = "ocrflow.s3.bucket"  # resource label the deployment trigger groups runs by
MAX_BODY_BYTES = 1024 * 1024  # SQS and SNS cap messages at 256 KiB; MinIO batches stay small


@dataclass
class IntakeCounts:
    notifications: int = 0
    changes: int = 0
    registered: int = 0
    rejected: int = 0
    failed: int = 0


class EventIntake:
    """Turns notification bodies into registry updates and Prefect events, and counts them."""

    def __init__(self, settings: Settings, source: str) -> None:
        self.settings = settings
        self.source = source  # "http" or "sqs", for the rejected-event payload
        self.counts = IntakeCounts()
        self._lock = threading.Lock()

    def accept(self, body: str | bytes) -> list[ObjectChange]:
        """Handles one notification. Raises MalformedEvent for the sender's mistakes; anything
        else (S3 or the database unreachable) propagates for the sender to retry."""
        try:
            changes = parse_notification(body)
        except MalformedEvent as exc:
            self._count(rejected=1)
            emit_event(
                event=REJECTED_EVENT,
                resource={"prefect.resource.id": f"ocrflow.event-intake.{self.source}"},
                payload={"error": str(exc), "body_excerpt": _excerpt(body)},
            )
            raise
        # Our own results written back to S3 notify too: not documents, never ingested.
        changes = [c for c in changes if not is_results_key(c.bucket, c.key, self.settings)]
        try:
            summary = reconcile_keys(
                (S3Location(c.bucket, c.key) for c in changes), self.settings, by_event=True
            )
        except Exception:
            self._count(failed=1)
            raise
        for change in changes:
            emit_object_event(change)
        self._count(notifications=1, changes=len(changes), registered=summary.registered)
        return changes

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self.counts, name, getattr(self.counts, name) + value)


def emit_object_event(change: ObjectChange) -> None:
    """One Prefect event per object change; deployment triggers match on its name."""
    emit_event(
        event=f"{EVENT_PREFIX}.{change.kind}",
        resource={
            "prefect.resource.id": change.uri,
            "prefect.resource.name": change.key,
            BUCKET_LABEL: change.bucket,
        },
        payload={
            "event_name": change.event_name,
            "etag": change.etag,
            "size": change.size,
            "version_id": change.version_id,
            "sequencer": change.sequencer,
        },
    )


def _excerpt(body: str | bytes, limit: int = 500) -> str:
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    return text[:limit]


# HTTP receiver ---------------------------------------------------------------------------


def make_receiver(intake: EventIntake, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server: POST a notification to any path (202, 400 or 503); GET /health counts."""

    class NotificationHandler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
                return
            body = self.rfile.read(length)
            try:
                changes = intake.accept(body)
            except MalformedEvent as exc:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            except Exception as exc:
                logger.exception("could not register a notification")
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": type(exc).__name__})
            else:
                self._reply(HTTPStatus.ACCEPTED, {"accepted": len(changes)})

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("", "/health"):
                self._reply(HTTPStatus.OK, asdict(intake.counts))
            else:
                self._reply(HTTPStatus.NOT_FOUND, {"error": "not found"})

        def _reply(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug(format, *args)

    return ThreadingHTTPServer((host, port), NotificationHandler)


# SQS poller ------------------------------------------------------------------------------


def poll_sqs_once(intake: EventIntake, queue_url: str, *, wait_seconds: int = 20) -> int:
    """One long poll: handles up to 10 messages; returns how many were received.

    A message is deleted once registered, or when malformed (it can never succeed); on any
    other failure it stays, and SQS redelivers it after its visibility timeout.
    """
    sqs = sqs_client()
    response = sqs.receive_message(
        QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_seconds
    )
    messages = response.get("Messages", [])
    for message in messages:
        try:
            intake.accept(message["Body"])
        except MalformedEvent as exc:
            logger.warning("dropping malformed message %s: %s", message["MessageId"], exc)
        except Exception:
            logger.exception("message %s left for redelivery", message["MessageId"])
            continue
        sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return len(messages)
