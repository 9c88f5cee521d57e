"""Error kinds. The kind decides the policy: permanent input errors are recorded and never
retried; transient errors (network, database restart, GPU out of memory) are retried."""

from __future__ import annotations


class OcrflowError(Exception):
    """Base of ocrflow's own errors."""


class PermanentInputError(OcrflowError, ValueError):
    """The input itself is bad; retrying cannot help. Its message is the recorded reason."""


class EncryptedDocument(PermanentInputError):
    pass


class CorruptDocument(PermanentInputError):
    pass


class EmptyDocument(PermanentInputError):
    pass


class UnsupportedDocument(PermanentInputError):
    pass


class DocumentTooLarge(PermanentInputError):
    pass


class SourceChanged(OcrflowError):
    """The object was overwritten or deleted since it was registered: that version is gone."""


class UnreadablePage(PermanentInputError):
    """One page cannot be loaded or rendered; the rest of its document goes on."""


class TransientError(OcrflowError):
    """Worth retrying with backoff."""


class InfrastructureError(TransientError):
    """Something the page does not cause is away: no GPU worker, a timeout, the database or S3.

    Never split a batch over it (every page would fail the same way) and never blame a page.
    """


class EngineUnavailable(InfrastructureError):
    """The OCR engine cannot take pages now (no live GPU worker, queue not answered in time)."""


def is_transient(exc: BaseException) -> bool:
    """Whether a failure is worth a retry: anything but a permanent input error."""
    return not isinstance(exc, PermanentInputError)


def is_infrastructure(exc: BaseException) -> bool:
    """Whether `exc` says a service is away rather than that the work item is bad.

    Ours (`InfrastructureError`), connection-level database errors, S3/botocore connection
    errors and throttling, and plain timeouts or connection errors.
    """
    if isinstance(exc, InfrastructureError | TimeoutError | ConnectionError):
        return True
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or _is_operational(exc.orig)
    from botocore.exceptions import ClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, BotoConnectionError):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or error.get("Code") in _THROTTLING_CODES
    return False


_THROTTLING_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout"}
)


def _is_operational(orig: BaseException | None) -> bool:
    import psycopg

    return isinstance(orig, psycopg.OperationalError)
