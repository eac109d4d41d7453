"""The error taxonomy of the server and the one table that maps it to gRPC status codes.

Inner modules (audio, batcher, models) raise these plain exceptions; only the edge (the
interceptor in `server.interceptors`) turns them into statuses. Anything not listed here is a
bug: it becomes INTERNAL, is logged once with its traceback, and the client sees no traceback.
"""

from __future__ import annotations

import grpc

MAX_ECHO_CHARS = 64  # a client's value quoted in an error message is cut to this


def clip(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """`value` as text for an error message, cut to `limit` characters: a 1 MB field must not
    come back as a 1 MB status message (gRPC refuses metadata that large)."""
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class AsrError(Exception):
    """Base of every error the server reports to a client on purpose."""


class InvalidArgumentError(AsrError):
    """The request itself is wrong (bad field, bad config); retrying it unchanged won't help."""


class InvalidAudioError(InvalidArgumentError):
    """The audio bytes can't be decoded, are empty, or break a limit."""


class QueueFullError(AsrError):
    """The batch queue is at capacity: back off and retry."""


class DeadlineExceededError(AsrError):
    """The client's deadline passed before the model could serve the request."""


class UnavailableError(AsrError):
    """The server is starting or draining and takes no new work."""


class BatchError(AsrError):
    """The model call for a batch failed; every request of that batch gets this error."""


class DeviceOutOfMemoryError(AsrError):
    """The accelerator ran out of memory for this work even alone (after the batch was
    retried in smaller pieces): retry later, or send shorter audio."""


class UnrecoverableError(AsrError):
    """This process can't serve any more (PyTriton's "unrecoverable" error): the engine stops
    taking work, health goes NOT_SERVING, and the server drains and exits non-zero so that
    the orchestrator replaces it. Clients get UNAVAILABLE: retry on another replica."""


class DeviceFaultError(UnrecoverableError):
    """The accelerator failed in a way the process can't recover from (a sticky CUDA error
    such as a device-side assert or an illegal memory access)."""


class UnimplementedError(AsrError):
    """The rpc or option is declared but not implemented by this server."""


class UnauthenticatedError(AsrError):
    """The call carries no valid bearer token (with `--auth-token-file`)."""


class ClientLimitError(QueueFullError):
    """One client has more calls or streams open than its share (per-client caps)."""


# Checked in order: the first matching class wins, so subclasses come before their bases.
STATUS_BY_ERROR: tuple[tuple[type[AsrError], grpc.StatusCode], ...] = (
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeviceOutOfMemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnrecoverableError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (UnimplementedError, grpc.StatusCode.UNIMPLEMENTED),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (BatchError, grpc.StatusCode.INTERNAL),
)


def status_for(error: BaseException) -> grpc.StatusCode:
    """The status a client gets for `error`; INTERNAL for anything unexpected."""
    for error_type, code in STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL
