"""The exception tree, and the one table that maps it to gRPC status codes.

    FeatmapError                  base; never raised itself
    ├── InvalidRequest            INVALID_ARGUMENT; names the offending field
    │   ├── InvalidSpec           the pipeline spec (schema, cross-field, shape for an image)
    │   ├── InvalidTensor         a tensor or array (dtype, shape, bytes, values)
    │   └── NonFiniteResult       the pipeline produced NaN/Inf from finite input (overflow)
    ├── NotFound                  NOT_FOUND; an unknown pipeline id or shared-memory region
    ├── AlreadyExists             ALREADY_EXISTS; a pipeline name that names another pipeline
    ├── NotPermitted              PERMISSION_DENIED; shared memory off, or not on the Unix socket
    ├── LimitExceeded             RESOURCE_EXHAUSTED; a configured limit, with limit and value
    │   └── Busy                  RESOURCE_EXHAUSTED, retryable; a budget held by work in flight
    ├── StreamIdle                DEADLINE_EXCEEDED; no stream message within the idle timeout
    ├── Unsupported               FAILED_PRECONDITION; this machine cannot run it as asked
    ├── ExecutionFailed           INTERNAL; onnxruntime failed to build or run a session
    ├── Unavailable               UNAVAILABLE; shutting down, or the pipeline store unreachable
    └── Abandoned                 the caller stopped waiting before the work started
        ├── Cancelled             CANCELLED; the caller went away
        └── DeadlineExceeded      DEADLINE_EXCEEDED; the caller's deadline passed

Every message starts with the field it is about: `layers[2].kernel_size: ...`. Messages and
fields are capped in length (MAX_MESSAGE_CHARS, MAX_FIELD_CHARS): they may quote what a caller
sent, and a caller may send megabytes. Lists quoted in messages go through `listing`, which
stops after a few items, so that no message is built from a million layer names either.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

MAX_MESSAGE_CHARS = 1024
MAX_FIELD_CHARS = 128
MAX_LISTED_ITEMS = 16


def shorten(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters and how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def listing(items: Iterable[object], limit: int = MAX_LISTED_ITEMS) -> str:
    """`[a, b, ...]` of the first `limit` items (repr, each shortened), and how many more."""
    shown: list[str] = []
    more = 0
    for item in items:
        if len(shown) < limit:
            shown.append(shorten(repr(item), MAX_FIELD_CHARS))
        else:
            more += 1
    return f"[{', '.join(shown)}{f', ... ({more} more)' if more else ''}]"


class FeatmapError(Exception):
    """Base of every error featmap raises on purpose."""

    # Whether the same call may succeed later unchanged (the server marks it featmap-retryable).
    retryable = False

    def __init__(self, field: str, message: str, *, detail: str | None = None) -> None:
        field = shorten(field, MAX_FIELD_CHARS)
        message = shorten(message, MAX_MESSAGE_CHARS)
        super().__init__(shorten(detail, MAX_MESSAGE_CHARS) if detail else f"{field}: {message}")
        self.field = field
        self.message = message

    @property
    def status_code(self) -> grpc.StatusCode:
        """The gRPC status this error travels as."""
        return status_for(self)


class InvalidRequest(FeatmapError):
    """The request is malformed; retrying it unchanged cannot succeed."""


class InvalidSpec(InvalidRequest):
    """The pipeline spec is invalid, or invalid for the images it was sent with."""


class InvalidTensor(InvalidRequest):
    """A tensor or array does not decode, has a dtype featmap does not take, or does not fit."""


class NonFiniteResult(InvalidRequest):
    """Finite input produced NaN or Inf (weights, scale or depth overflowed float32)."""


class NotFound(FeatmapError):
    """The request names a pipeline or shared-memory region the caller cannot see."""


class AlreadyExists(FeatmapError):
    """A pipeline name is taken by another pipeline (re-register with replace to move it)."""


class NotPermitted(FeatmapError):
    """The caller may not use this here: shared memory is off, or the call is not local."""


class LimitExceeded(FeatmapError):
    """A configured server limit or memory budget is exceeded."""


class Busy(LimitExceeded):
    """A budget is held by work in flight; the same call may fit once that work is done."""

    retryable = True


class StreamIdle(FeatmapError):
    """A stream sent no message within the server's idle timeout, so the server ended it."""


class Unsupported(FeatmapError):
    """This machine cannot run the request as asked (an int8 model made for another CPU)."""


class ExecutionFailed(FeatmapError):
    """onnxruntime failed to build or run a session."""


class Unavailable(FeatmapError):
    """The server is shutting down, or its pipeline store is out of reach: retry, elsewhere."""


class Abandoned(FeatmapError):
    """The caller stopped waiting, so work that had not started is dropped."""


class Cancelled(Abandoned):
    """The caller cancelled or disconnected before its work started."""


class DeadlineExceeded(Abandoned):
    """The caller's deadline passed before its work started."""


# By name: gRPC is imported when a status is asked for, so that an embedded job (which raises
# these, and never sends them) loads no gRPC.
STATUS_CODES: dict[type[FeatmapError], str] = {
    FeatmapError: "UNKNOWN",
    AlreadyExists: "ALREADY_EXISTS",
    InvalidRequest: "INVALID_ARGUMENT",
    InvalidSpec: "INVALID_ARGUMENT",
    InvalidTensor: "INVALID_ARGUMENT",
    NonFiniteResult: "INVALID_ARGUMENT",
    NotFound: "NOT_FOUND",
    NotPermitted: "PERMISSION_DENIED",
    LimitExceeded: "RESOURCE_EXHAUSTED",
    Busy: "RESOURCE_EXHAUSTED",
    StreamIdle: "DEADLINE_EXCEEDED",
    Unsupported: "FAILED_PRECONDITION",
    ExecutionFailed: "INTERNAL",
    Unavailable: "UNAVAILABLE",
    Abandoned: "CANCELLED",
    Cancelled: "CANCELLED",
    DeadlineExceeded: "DEADLINE_EXCEEDED",
}


def status_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an exception (INTERNAL for anything unexpected)."""
    import grpc

    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return grpc.StatusCode[STATUS_CODES[cls]]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL
