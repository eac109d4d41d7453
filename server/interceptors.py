"""The last-resort error interceptor: maps `server.errors` to statuses, counts every RPC.

Handlers raise plain exceptions; this is the one place that turns them into gRPC statuses
(through the table in `server.errors`). Anything unexpected is logged once, with its traceback,
and the client gets INTERNAL with a short message and no traceback. The server goes on.
Each call is counted once with the status its client saw, also when it ends before or while its
request arrives (`server.calls`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server.calls import Call, OpenCalls
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


async def _checked(
    request_iterator: AsyncIterator[Any], call: Call, context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    async for request in request_iterator:
        yield _check(request)
    call.input_ended()
    if not await _still_open(context):  # judged now, while the refusal is fresh
        call.cut = call.cut_short()


async def _still_open(context: grpc.aio.ServicerContext) -> bool:
    """Whether the call can still be answered. A request stream ends the same way for a
    half-close and for a message gRPC refused (over the size limit: gRPC has answered the client
    and ended the call); sending the initial metadata tells them apart while it hasn't been
    sent (once a response was written, the next write fails instead)."""
    try:
        await context.send_initial_metadata(())
    except grpc.aio.UsageError:  # already sent
        return True
    except Exception:  # the batch failed: the call is over
        return False
    return True


_EOF = object()


async def _only(requests: AsyncIterator[Any], call: Call) -> Any:
    """The one message of a unary call. None came: gRPC refused it (over the size limit) and
    has answered the client itself, so the handler ends without a status of its own."""
    request = await anext(aiter(requests), _EOF)
    if request is _EOF:
        call.input_ended()
        raise asyncio.CancelledError
    return request


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics, access: Access | None = None) -> None:
        self.metrics = metrics
        self.access = access or Access()  # tokens and per-client caps, checked first
        self.calls = OpenCalls()  # the drain waits on these before it ends what is left

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
        # Opened here, in the call's own task, before its request is read: whatever ends the
        # call from now on (its deadline, a refused message, gRPC's concurrency limit) is seen.
        call = Call(method)
        self.calls.open(lambda: self._settle(call))
        if handler.unary_unary is not None:
            # Served as a client stream of one message (the same bytes on the wire): the
            # wrapper then holds the context while the request arrives, so a call cut short
            # during its upload is counted with its deadline in view.
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(call, handler.unary_unary),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(call, handler.stream_stream),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_unary(self, call: Call, behavior: Any) -> Any:
        async def wrapped(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            call.begin(context.time_remaining())
            try:
                with self.access.admit(context, stream=False):
                    request = await _only(requests, call)
                    response = await behavior(_check(request), context)
            except BaseException as err:
                await self._fail(call, err, context)
                raise
            self._count_call(call, _ok_or_late(call))
            return response

        return wrapped

    def _wrap_stream(self, call: Call, behavior: Any) -> Any:
        async def wrapped(
            request_iterator: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator:
            call.begin(context.time_remaining())
            try:
                with self.access.admit(context, stream=True):
                    requests = _checked(request_iterator, call, context)
                    async for response in behavior(requests, context):
                        yield response
            except BaseException as err:
                await self._fail(call, err, context)
                raise
            self._count_call(call, call.cut or _ok_or_late(call))

        return wrapped

    async def _fail(
        self, call: Call, err: BaseException, context: grpc.aio.ServicerContext
    ) -> None:
        """Turn `err` into a status: abort() raises, so the caller's `raise` is only reached
        for cancellation and aborts that already carry their status."""
        if isinstance(err, grpc.aio.AbortError):
            code = getattr(context, "code", lambda: None)() or grpc.StatusCode.UNKNOWN
            self._count_call(call, code)
            return
        if not isinstance(err, Exception):  # CancelledError: the client went away, its
            # deadline passed, or gRPC refused its message (gRPC answered the client itself)
            self._count_call(call, call.cut_short())
            return
        code = status_for(err)
        if call.late():
            code = grpc.StatusCode.DEADLINE_EXCEEDED  # what the client saw, whatever we say
        if isinstance(err, AsrError):
            message = clip(str(err), MAX_MESSAGE_CHARS)
            log.info("%s -> %s: %s", call.method, code.name, message)
        else:
            message = f"internal error ({type(err).__name__}); the server logged the details"
            log.exception("%s failed unexpectedly", call.method)
        self._count_call(call, code)
        await context.abort(code, message)

    def _settle(self, call: Call) -> None:
        """The call's task ended: count it if no handler did (it ended before one ran)."""
        if call.code is None:
            self._count_call(call, call.cut_short())

    def _count_call(self, call: Call, code: grpc.StatusCode) -> None:
        if call.code is None:
            call.code = code
            self._count(call.method, code, call.started)

    def _count(self, method: str, code: grpc.StatusCode, started: float) -> None:
        """Every call is counted once, with the status its client saw."""
        self.metrics.requests.labels(method, code.name).inc()
        if code == grpc.StatusCode.OK:  # a fast rejection must not make latency look good
            self.metrics.request_seconds.labels(method).observe(time.monotonic() - started)


def _ok_or_late(call: Call) -> grpc.StatusCode:
    """A handler that finished after its client's deadline: the client saw DEADLINE_EXCEEDED."""
    return grpc.StatusCode.DEADLINE_EXCEEDED if call.late() else grpc.StatusCode.OK
