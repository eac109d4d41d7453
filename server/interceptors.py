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

from server.errors import AsrError, status_for
from server.metrics import Metrics

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


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

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
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(method, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_unary(self, method: str, behavior: Any) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.monotonic()
            try:
                response = await behavior(request, context)
            except BaseException as err:
                await self._fail(method, err, context, started)
                raise
            self._count(method, grpc.StatusCode.OK, started)
            return response

        return wrapped

    def _wrap_stream(self, method: str, behavior: Any) -> Any:
        async def wrapped(
            request_iterator: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator:
            started = time.monotonic()
            try:
                async for response in behavior(request_iterator, context):
                    yield response
            except BaseException as err:
                await self._fail(method, err, context, started)
                raise
            self._count(method, grpc.StatusCode.OK, started)

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
        if not isinstance(err, Exception):  # CancelledError: the client went away
            self._count(method, grpc.StatusCode.CANCELLED, started)
            return
        code = status_for(err)
        if isinstance(err, AsrError):
            message = str(err)
            log.info("%s -> %s: %s", method, code.name, message)
        else:
            message = f"internal error ({type(err).__name__}); the server logged the details"
            log.exception("%s failed unexpectedly", method)
        self._count(method, code, started)
        await context.abort(code, message)

    def _count(self, method: str, code: grpc.StatusCode, started: float) -> None:
        self.metrics.requests.labels(method, code.name).inc()
        if code == grpc.StatusCode.OK:  # a fast rejection must not make latency look good
            self.metrics.request_seconds.labels(method).observe(time.monotonic() - started)
