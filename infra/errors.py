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


class TransientError(OcrflowError):
    """Worth retrying with backoff."""


def is_transient(exc: BaseException) -> bool:
    """Whether a failure is worth a retry: anything but a permanent input error."""
    return not isinstance(exc, PermanentInputError)
