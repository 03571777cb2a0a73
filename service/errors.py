"""The exception tree of the service and the one table that maps it to gRPC status codes.

    FeatmapError                  base; never raised itself
    ├── InvalidRequest            INVALID_ARGUMENT; names the offending field
    │   ├── InvalidSpec           the pipeline spec (schema, cross-field, shape for an image)
    │   ├── InvalidTensor         the image tensor on the wire (dtype, shape, bytes, values)
    │   └── NonFiniteResult       the pipeline produced NaN/Inf from finite input (overflow)
    ├── NotFound                  NOT_FOUND; an unknown pipeline id or shared-memory region
    ├── LimitExceeded             RESOURCE_EXHAUSTED; a configured limit, with limit and value
    ├── ExecutionFailed           INTERNAL; onnxruntime failed to build or run a session
    └── Abandoned                 the caller stopped waiting before the work started
        ├── Cancelled             CANCELLED; the caller went away
        └── DeadlineExceeded      DEADLINE_EXCEEDED; the caller's deadline passed

Every message starts with the field it is about: `layers[2].kernel_size: ...`.
"""

from __future__ import annotations

import grpc


class FeatmapError(Exception):
    """Base of every error the service raises on purpose."""

    def __init__(self, field: str, message: str, *, detail: str | None = None) -> None:
        super().__init__(detail or f"{field}: {message}")
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
    """The image tensor does not decode or does not fit the spec's input."""


class NonFiniteResult(InvalidRequest):
    """Finite input produced NaN or Inf (weights, scale or depth overflowed float32)."""


class NotFound(FeatmapError):
    """The request names a pipeline id or shared-memory region the server does not have."""


class LimitExceeded(FeatmapError):
    """A configured server limit is exceeded."""


class ExecutionFailed(FeatmapError):
    """onnxruntime failed to build or run a session."""


class Abandoned(FeatmapError):
    """The caller stopped waiting, so work that had not started is dropped."""


class Cancelled(Abandoned):
    """The caller cancelled or disconnected before its work started."""


class DeadlineExceeded(Abandoned):
    """The caller's deadline passed before its work started."""


STATUS_CODES: dict[type[FeatmapError], grpc.StatusCode] = {
    FeatmapError: grpc.StatusCode.UNKNOWN,
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidSpec: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidTensor: grpc.StatusCode.INVALID_ARGUMENT,
    NonFiniteResult: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ExecutionFailed: grpc.StatusCode.INTERNAL,
    Abandoned: grpc.StatusCode.CANCELLED,
    Cancelled: grpc.StatusCode.CANCELLED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an exception (INTERNAL for anything unexpected)."""
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL
