"""S3 event intake: an SQS poller and an HTTP receiver feeding the registry and Prefect.

For every notification: parse it (any envelope, see `tasks.s3_events`), reconcile each named
key with S3 into the registry, then emit one Prefect event per object change. Registering
*before* emitting is what makes the debounced trigger safe: by the time the triggered
`ingest-s3-objects` run starts, every change in its window is already waiting in the registry.

The sender's mistakes are told apart from our outages, because they are handled oppositely:
- a body that is not a notification, or a record naming an impossible bucket or key (NUL and
  other control characters, empty, over 1,024 bytes), can never become valid: it is rejected
  (HTTP 400; deleted from SQS with a log line), counted per record and emitted as
  `ocrflow.s3.event.rejected`. Valid records beside a bad one are registered (HTTP 202 with
  the rejected records listed); only a notification with no usable record is a 400.
- S3 or the database unreachable is not the sender's fault: HTTP 503, and the SQS message
  stays for redelivery.

The HTTP receiver never trusts `Content-Length` beyond `MAX_BODY_BYTES` and never waits on a
stalled sender longer than its read timeout: a poison request costs one thread a few seconds.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prefect.events import emit_event

from infra.db.migrate import ensure_schema
from infra.s3 import S3Location, sqs_client
from infra.settings import Settings
from tasks.results_s3 import is_results_key
from tasks.s3_events import MalformedEvent, ObjectChange, RejectedRecord, parse_notification
from tasks.s3_reconcile import reconcile_keys

logger = logging.getLogger("ocrflow.events")

EVENT_PREFIX = "ocrflow.s3.object"  # + ".created" / ".removed"
REJECTED_EVENT = "ocrflow.s3.event.rejected"
BUCKET_LABEL = "ocrflow.s3.bucket"  # resource label the deployment trigger groups runs by
MAX_BODY_BYTES = 1024 * 1024  # SQS and SNS cap messages at 256 KiB; MinIO batches stay small
READ_TIMEOUT_SECONDS = 30.0  # a sender that stops mid-request loses its connection after this


@dataclass
class IntakeCounts:
    notifications: int = 0  # notifications with at least one usable record
    changes: int = 0
    registered: int = 0
    rejected: int = 0  # records (or whole bodies) refused as the sender's mistake
    failed: int = 0  # notifications that hit an outage (503 / left in SQS)


@dataclass(frozen=True)
class IntakeResult:
    """One notification handled: the changes registered and the records refused."""

    accepted: list[ObjectChange] = field(default_factory=list)
    rejected: list[RejectedRecord] = field(default_factory=list)
    all_rejected: bool = False  # nothing usable in it: the sender's mistake as a whole

    def as_reply(self) -> dict[str, Any]:
        return {
            "accepted": len(self.accepted),
            "rejected": [asdict(record) for record in self.rejected],
        }


class EventIntake:
    """Turns notification bodies into registry updates and Prefect events, and counts them."""

    def __init__(self, settings: Settings, source: str) -> None:
        self.settings = settings
        self.source = source  # "http" or "sqs", for the rejected-event payload
        self.counts = IntakeCounts()
        self._lock = threading.Lock()
        self._schema_lock = threading.Lock()
        self._schema_ready = False

    def ensure_schema(self) -> None:
        """Creates or upgrades the registry's schema once, like `ingest` does: an empty database
        must not turn every event into a 503. Retried on the next notification if it fails."""
        with self._schema_lock:
            if not self._schema_ready:
                ensure_schema(self.settings.database_url)
                self._schema_ready = True

    def accept(self, body: str | bytes) -> IntakeResult:
        """Handles one notification. Raises MalformedEvent when the body is not a notification;
        rejected records come back in the result; anything else (S3 or the database
        unreachable) propagates for the sender to retry."""
        try:
            notification = parse_notification(body)
        except MalformedEvent as exc:
            self.count(rejected=1)
            self._emit_rejected(body, [str(exc)])
            raise
        if notification.rejected:
            self.count(rejected=len(notification.rejected))
            self._emit_rejected(
                body, [f"record {r.index}: {r.error}" for r in notification.rejected]
            )
        if notification.all_rejected:
            return IntakeResult(rejected=notification.rejected, all_rejected=True)
        # Our own results written back to S3 notify too: not documents, never ingested.
        changes = [
            c for c in notification.changes if not is_results_key(c.bucket, c.key, self.settings)
        ]
        try:
            self.ensure_schema()
            summary = reconcile_keys(
                (S3Location(c.bucket, c.key) for c in changes), self.settings, by_event=True
            )
        except Exception:
            self.count(failed=1)
            raise
        refused = {(s.bucket, s.key): s.error for s in summary.skipped}
        accepted = [c for c in changes if (c.bucket, c.key) not in refused]
        rejected = notification.rejected + [
            RejectedRecord(c.record_index, refused[c.bucket, c.key])
            for c in changes
            if (c.bucket, c.key) in refused
        ]
        for change in accepted:
            emit_object_event(change)
        self.count(
            notifications=1,
            changes=len(accepted),
            registered=summary.registered,
            rejected=len(rejected) - len(notification.rejected),
        )
        everything_refused = bool(rejected) and len(rejected) == notification.records
        return IntakeResult(accepted, sorted(rejected, key=lambda r: r.index), everything_refused)

    def _emit_rejected(self, body: str | bytes, errors: list[str]) -> None:
        emit_event(
            event=REJECTED_EVENT,
            resource={"prefect.resource.id": f"ocrflow.event-intake.{self.source}"},
            payload={"errors": errors, "body_excerpt": _excerpt(body)},
        )

    def count(self, **increments: int) -> None:
        """Adds to the counters (thread-safe: the HTTP receiver serves requests in threads)."""
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


class BodyRefused(Exception):
    """A request body we will not read; `status` is the answer."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


_DIGITS = re.compile(r"[0-9]{1,19}")


def declared_length(content_length: list[str] | None, transfer_encoding: str | None) -> int:
    """The body size a request declares, or `BodyRefused`: missing (411, chunked included),
    not a non-negative integer or contradictory (400), or over `MAX_BODY_BYTES` (413)."""
    if transfer_encoding and transfer_encoding.strip().lower() != "identity":
        raise BodyRefused(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
    values = {value.strip() for value in content_length or []}
    if not values:
        raise BodyRefused(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
    if len(values) > 1 or not _DIGITS.fullmatch(next(iter(values))):
        raise BodyRefused(HTTPStatus.BAD_REQUEST, f"invalid Content-Length {sorted(values)!r}")
    length = int(next(iter(values)))
    if length > MAX_BODY_BYTES:
        raise BodyRefused(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over the limit of {MAX_BODY_BYTES} bytes"
        )
    return length


def make_receiver(
    intake: EventIntake, host: str, port: int, *, read_timeout: float = READ_TIMEOUT_SECONDS
) -> ThreadingHTTPServer:
    """An HTTP server: POST a notification to any path (202, 400, 411, 413 or 503);
    GET /health returns the counts."""

    class NotificationHandler(BaseHTTPRequestHandler):
        timeout = read_timeout  # applied to the socket: a stalled sender frees its thread

        def do_POST(self) -> None:
            try:
                body = self._read_body()
            except BodyRefused as refused:
                self._refuse(refused.status, str(refused))
                return
            except TimeoutError:
                self._refuse(HTTPStatus.REQUEST_TIMEOUT, "body not received in time")
                return
            try:
                result = intake.accept(body)
            except MalformedEvent as exc:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            except Exception as exc:
                logger.exception("could not register a notification")
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": type(exc).__name__})
            else:
                if result.all_rejected:
                    reply = {"error": "no usable record", **result.as_reply()}
                    self._reply(HTTPStatus.BAD_REQUEST, reply)
                else:
                    self._reply(HTTPStatus.ACCEPTED, result.as_reply())

        def _read_body(self) -> bytes:
            length = declared_length(
                self.headers.get_all("Content-Length"), self.headers.get("Transfer-Encoding")
            )
            body = self.rfile.read(length)  # never more than declared, never over the limit
            if len(body) < length:
                raise BodyRefused(
                    HTTPStatus.BAD_REQUEST, f"body ended after {len(body)} of {length} bytes"
                )
            return body

        def _refuse(self, status: HTTPStatus, error: str) -> None:
            self.close_connection = True  # what is left of the body must not be read as a request
            intake.count(rejected=1)
            self._reply(status, {"error": error})

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
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug(format, *args)

    return ThreadingHTTPServer((host, port), NotificationHandler)


# SQS poller ------------------------------------------------------------------------------


def poll_sqs_once(intake: EventIntake, queue_url: str, *, wait_seconds: int = 20) -> int:
    """One long poll: handles up to 10 messages; returns how many were received.

    A message is deleted once registered, or when malformed or only partly usable (what is
    wrong can never succeed, and redelivering it would loop forever): each dropped record is
    logged with its reason. On any other failure it stays, and SQS redelivers it after its
    visibility timeout (give the queue a dead-letter queue for what keeps failing).
    """
    sqs = sqs_client()
    response = sqs.receive_message(
        QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_seconds
    )
    messages = response.get("Messages", [])
    for message in messages:
        message_id = message["MessageId"]
        try:
            result = intake.accept(message["Body"])
        except MalformedEvent as exc:
            logger.warning("deleting malformed message %s: %s", message_id, exc)
        except Exception:
            logger.exception("message %s left for redelivery", message_id)
            continue
        else:
            for record in result.rejected:
                logger.warning(
                    "message %s: dropping record %d: %s", message_id, record.index, record.error
                )
        sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return len(messages)
