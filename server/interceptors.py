"""The last-resort error interceptor: maps `server.errors` to statuses, counts every RPC.

Handlers raise plain exceptions; this is the one place that turns them into gRPC statuses
(through the table in `server.errors`). Anything unexpected is logged once, with its traceback,
and the client gets INTERNAL with a short message and no traceback. The server goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server.errors import AsrError, InvalidArgumentError, clip, status_for
from server.metrics import Metrics
from server.security import Access

log = logging.getLogger(__name__)

SPEECH_PREFIX = "/asr.v1.Speech/"
# The drop-in vendor APIs share the error table and the metrics; their method label keeps
# the service ("google.cloud.speech.v1.Speech/Recognize"), asr.v1's stays the bare method.
VENDOR_PREFIXES = ("/google.cloud.speech.v1.Speech/", "/nvidia.riva.asr.RivaSpeechRecognition/")


def method_label(method_path: str) -> str | None:
    """The metrics label of an RPC this interceptor wraps; None for the others (health...)."""
    if method_path.startswith(SPEECH_PREFIX):
        return method_path.removeprefix(SPEECH_PREFIX)
    if method_path.startswith(VENDOR_PREFIXES):
        return method_path.removeprefix("/")
    return None


MAX_MESSAGE_CHARS = 1024  # a status message longer than this is cut (gRPC metadata is bounded)


class _Malformed:
    """What the deserializer hands on for bytes that aren't the rpc's message: the handler
    turns it into INVALID_ARGUMENT (gRPC's own answer, UNKNOWN with a Python class name, is
    neither counted nor helpful)."""

    def __init__(self, message_name: str) -> None:
        self.message_name = message_name


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    message_name = getattr(name, "full_name", "request")

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return _Malformed(message_name)

    return deserialize


def _check(request: Any) -> Any:
    if isinstance(request, _Malformed):
        raise InvalidArgumentError(f"the request is not a valid {request.message_name} message")
    return request


async def _checked(request_iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in request_iterator:
        yield _check(request)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics, access: Access | None = None) -> None:
        self.metrics = metrics
        self.access = access or Access()  # tokens and per-client caps, checked first

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method_path: str = handler_call_details.method  # type: ignore[attr-defined]
        method = method_label(method_path)
        if handler is None or method is None:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(method, handler.stream_stream),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_unary(self, method: str, behavior: Any) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.monotonic()
            try:
                with self.access.admit(context, stream=False):
                    response = await behavior(_check(request), context)
            except BaseException as err:
                await self._fail(method, err, context, started)
                raise
            self._count(method, _ok_or_late(context), started)
            return response

        return wrapped

    def _wrap_stream(self, method: str, behavior: Any) -> Any:
        async def wrapped(
            request_iterator: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator:
            started = time.monotonic()
            try:
                with self.access.admit(context, stream=True):
                    async for response in behavior(_checked(request_iterator), context):
                        yield response
            except BaseException as err:
                await self._fail(method, err, context, started)
                raise
            self._count(method, _ok_or_late(context), started)

        return wrapped

    async def _fail(
        self, method: str, err: BaseException, context: grpc.aio.ServicerContext, started: float
    ) -> None:
        """Turn `err` into a status: abort() raises, so the caller's `raise` is only reached
        for cancellation and aborts that already carry their status."""
        if isinstance(err, grpc.aio.AbortError):
            code = getattr(context, "code", lambda: None)() or grpc.StatusCode.UNKNOWN
            self._count(method, code, started)
            return
        if not isinstance(err, Exception):  # CancelledError: the client went away, or its
            # deadline passed (gRPC cancels the handler then; the client saw DEADLINE_EXCEEDED)
            late = _deadline_passed(context)
            code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
            self._count(method, code, started)
            return
        code = status_for(err)
        if _deadline_passed(context):
            code = grpc.StatusCode.DEADLINE_EXCEEDED  # what the client saw, whatever we say
        if isinstance(err, AsrError):
            message = clip(str(err), MAX_MESSAGE_CHARS)
            log.info("%s -> %s: %s", method, code.name, message)
        else:
            message = f"internal error ({type(err).__name__}); the server logged the details"
            log.exception("%s failed unexpectedly", method)
        self._count(method, code, started)
        await context.abort(code, message)

    def _count(self, method: str, code: grpc.StatusCode, started: float) -> None:
        """Every call is counted once, with the status its client saw."""
        self.metrics.requests.labels(method, code.name).inc()
        if code == grpc.StatusCode.OK:  # a fast rejection must not make latency look good
            self.metrics.request_seconds.labels(method).observe(time.monotonic() - started)


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _ok_or_late(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """A handler that finished after its client's deadline: the client saw DEADLINE_EXCEEDED."""
    return grpc.StatusCode.DEADLINE_EXCEEDED if _deadline_passed(context) else grpc.StatusCode.OK
