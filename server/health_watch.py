"""The standard health servicer, with Watch streams that end when the server closes.

grpc's own `HealthServicer.Watch` never returns: an open Watch (client-side health checking,
Envoy, service meshes) would hold `server.stop(grace)` until the grace period runs out, so every
rolling update would wait the whole grace. Here `close()` sets every service NOT_SERVING for
good, and each Watch stream writes that final status (if it hasn't yet) and ends with OK.
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health, health_pb2

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class _Recording:
    """The servicer context as grpc's Watch uses it (`write`), remembering the last status."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.last: int | None = None

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        await self.context.write(message)
        self.last = message.status

    def __getattr__(self, name: str) -> Any:
        return getattr(self.context, name)


class ClosingHealthServicer(health.aio.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self._closed = asyncio.Event()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        recording = _Recording(context)
        watching = asyncio.ensure_future(super().Watch(request, recording))
        closing = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({watching, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # the client went away, or the server closes: stop watching either way
            for waiter in (watching, closing):
                waiter.cancel()
            await asyncio.gather(watching, closing, return_exceptions=True)
        if not self._closed.is_set():  # grpc's Watch ended on its own: a write failed
            if not watching.cancelled():
                watching.result()  # raises what ended it
            return
        final = self.status(request.service)
        if recording.last != final:
            await context.write(health_pb2.HealthCheckResponse(status=final))

    def status(self, service: str) -> int:
        return self._server_status.get(service, SERVICE_UNKNOWN)

    async def close(self) -> None:
        """Every service NOT_SERVING from now on (later `set()` calls are ignored), and every
        open Watch stream ends after writing it."""
        await self.enter_graceful_shutdown()
        self._closed.set()
