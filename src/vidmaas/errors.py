"""The project's error tree.

Guarantees: every error vidmaas raises on purpose derives from ``VidmaasError`` and
carries a stable machine-readable ``code`` and, where one input field is to blame,
that ``field``. Third-party errors are wrapped at the boundary (``raise … from e``).
The mapping to HTTP statuses lives only in ``vidmaas.api.errors``.
"""

from __future__ import annotations


class VidmaasError(Exception):
    """Root of every error vidmaas raises on purpose."""

    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field


class InvalidRequest(VidmaasError):
    """The request is malformed or names something the model cannot do (422)."""

    code = "invalid_request"


class UnsupportedMedia(VidmaasError):
    """An upload is not an accepted image format (415)."""

    code = "unsupported_media_type"


class PayloadTooLarge(VidmaasError):
    """An upload exceeds the byte limit (413)."""

    code = "payload_too_large"


class Unauthenticated(VidmaasError):
    """No API key, or an unknown one (401)."""

    code = "unauthenticated"


class Forbidden(VidmaasError):
    """The caller is known but may not do this (403)."""

    code = "forbidden"


class NotFound(VidmaasError):
    """The thing does not exist, or is not the caller's (404)."""

    code = "not_found"


class Conflict(VidmaasError):
    """The request conflicts with the current state (409)."""

    code = "conflict"


class IllegalTransition(Conflict):
    """A status change that the state machine does not allow."""

    code = "illegal_transition"


class StaleTransition(Conflict):
    """The compare-and-set lost: the task was not in the expected status."""

    code = "stale_transition"


class RateLimited(VidmaasError):
    """The caller hit a quota (429)."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int, code: str | None = None,
                 field: str | None = None) -> None:
        super().__init__(message, code=code, field=field)
        self.retry_after_s = retry_after_s


class ServiceUnavailable(VidmaasError):
    """A backing service (database, Redis, object store) failed (503, with
    ``Retry-After: retry_after_s``): the request may succeed when retried."""

    code = "service_unavailable"
    retry_after_s: int = 5


class StorageError(ServiceUnavailable):
    """The object store failed."""

    code = "storage_error"


class StorageUnavailable(StorageError):
    """The object store is unreachable, timed out or answered 5xx or "slow down": an
    outage that a later attempt may not meet (``storage.retry`` retries these alone)."""


class QueueError(ServiceUnavailable):
    """Redis (queue or event streams) failed."""

    code = "queue_error"


class DatabaseUnavailable(ServiceUnavailable):
    """The database cannot be reached (down, restarting, or out of connections)."""

    code = "database_unavailable"


class ExecutorError(VidmaasError):
    """An executor could not launch, inspect or stop a job."""

    code = "executor_error"
