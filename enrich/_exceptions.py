"""Every error enrich raises, in one tree.

    EnrichError                      base of everything below
    ├── UsageError                   bad input, refused before anything is sent or spent
    │   └── CheckpointMismatchError  the checkpoint was made for a different job
    ├── CheckpointError              the checkpoint cannot be read or written
    ├── OutputError                  the result could not be written to `write_to` (also an OSError):
    │                                every answer is kept in the checkpoint
    └── APIError                     talking to the Task API went wrong
        ├── TransportError           no HTTP answer: connect failure, dropped connection, timeout
        ├── OutcomeUnknownError      a request that creates runs was sent, but its answer was lost:
        │                            the runs may exist; find out before sending it again
        ├── ForeignRunError          a run recorded for a row answers another input: the service
        │                            does not hold this checkpoint's runs
        └── APIStatusError           the API answered with an error status
            ├── BadRequestError          400
            ├── AuthenticationError      401  bad or missing API key
            ├── PaymentRequiredError     402  credit ran out
            ├── PermissionDeniedError    403  forbidden, e.g. an unknown processor
            ├── NotFoundError            404  unknown id, or the result of a failed run
            ├── StillRunningError        408  the blocking result call timed out; ask again
            ├── ConflictError            409
            ├── ValidationError          422  the request body was refused
            ├── RateLimitError           429  quota exceeded; `retry_after` says how long to wait
            └── ServerError              5xx  (the body may be HTML)

API errors carry what they came from as attributes: `status`, `message`, `ref_id`, `detail`, `request`
(method and URL only) and `should_retry` (the service's `x-should-retry` header, when it sent one).
None of them holds or prints the API key: the request's headers are never kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "APIError",
    "APIStatusError",
    "AuthenticationError",
    "BadRequestError",
    "CheckpointError",
    "CheckpointMismatchError",
    "ConflictError",
    "EnrichError",
    "ForeignRunError",
    "NotFoundError",
    "OutcomeUnknownError",
    "OutputError",
    "PaymentRequiredError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestInfo",
    "ServerError",
    "ServiceMismatchError",
    "StillRunningError",
    "TransportError",
    "UsageError",
    "ValidationError",
]


class EnrichError(Exception):
    """Base class of every error raised by enrich."""


class UsageError(EnrichError, ValueError):
    """Bad input (a column, a schema, an option): nothing was sent or spent.

    The message is one line that says what to fix.
    """


class CheckpointError(EnrichError):
    """The checkpoint directory cannot be read or written."""


class OutputError(EnrichError, OSError):
    """The result could not be written to its file (`write_to`, `enrich run -o`): a full disk, a
    permission. Every answer is kept in the checkpoint; the same call again writes it without paying
    twice. The OSError it came from is its `__cause__`."""


class CheckpointMismatchError(UsageError):
    """The checkpoint belongs to a different job; the message says what differs."""


class ServiceMismatchError(CheckpointMismatchError):
    """The checkpoint records runs of another service (another base URL, or the emulator): its run ids
    and answers are never used for this one."""


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The request an error came from: method and URL, never headers (they hold the API key)."""

    method: str
    url: str

    def __str__(self) -> str:
        return f"{self.method} {self.url}"


class APIError(EnrichError):
    """Base class of errors from talking to the Task API."""

    status: int | None = None

    def __init__(
        self,
        message: str,
        *,
        request: RequestInfo | None = None,
        ref_id: str | None = None,
        detail: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.ref_id = ref_id
        self.detail = detail

    def __str__(self) -> str:
        parts = [self.message]
        if self.status is not None:
            parts.insert(0, str(self.status))
        where = f" ({self.request})" if self.request is not None else ""
        ref = f" [ref_id {self.ref_id}]" if self.ref_id else ""
        return " ".join(parts) + where + ref

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class TransportError(APIError):
    """No HTTP answer arrived: the connection failed or dropped, or a timeout ran out."""


class OutcomeUnknownError(APIError):
    """A request that creates runs was sent but its answer was lost.

    The service may or may not have created the runs. Retrying blindly could pay twice, so the
    caller must first find out what exists (for example by reading the group's runs and their
    metadata). `cause` is the underlying error: a `TransportError` or a `ServerError`.
    """

    def __init__(self, message: str, *, cause: APIError, request: RequestInfo | None = None) -> None:
        super().__init__(message, request=request, ref_id=cause.ref_id, detail=cause.detail)
        self.cause = cause


class ForeignRunError(APIError):
    """A run the checkpoint recorded for a row carries another row's key (or none) in its metadata.

    The service answering is not the one that created the checkpoint's runs (another address, an
    emulator restarted): its answer is never joined. `run_id`, `row_key` (the row it
    was recorded for) and `claimed` (the key its metadata carries) say which. Also raised, with those
    None, when the service does not know a task group the checkpoint recorded (404).
    """

    def __init__(
        self, message: str, *, run_id: str | None = None, row_key: str | None = None, claimed: object = None
    ) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.row_key = row_key
        self.claimed = claimed


class APIStatusError(APIError):
    """The API answered with an error status; `status` holds it, and `should_retry` the service's
    `x-should-retry` header: True or False when it said, None when it did not."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        request: RequestInfo | None = None,
        ref_id: str | None = None,
        detail: Any = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message, request=request, ref_id=ref_id, detail=detail)
        self.status = status
        self.should_retry = should_retry


class BadRequestError(APIStatusError):
    """400."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong."""


class PaymentRequiredError(APIStatusError):
    """402: the account has no credit left for these runs."""


class PermissionDeniedError(APIStatusError):
    """403: forbidden, for example an unknown processor."""


class NotFoundError(APIStatusError):
    """404: unknown run or group id, or the result of a run that failed."""


class StillRunningError(APIStatusError):
    """408: the blocking result call timed out while the run is still active. Ask again."""


class ConflictError(APIStatusError):
    """409."""


class ValidationError(APIStatusError):
    """422: the request body was refused. `errors` lists the problems (loc, msg) when the API gave them."""

    @property
    def errors(self) -> list[dict[str, Any]]:
        if isinstance(self.detail, list):
            return [e for e in self.detail if isinstance(e, dict)]
        return []


class RateLimitError(APIStatusError):
    """429: the per-key quota was exceeded. `retry_after` is the server's wait in seconds, if it gave one."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(APIStatusError):
    """5xx: the service failed; the body may be an HTML page."""


STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: PaymentRequiredError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: StillRunningError,
    409: ConflictError,
    422: ValidationError,
    429: RateLimitError,
}
