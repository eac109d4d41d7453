"""A real server on loopback (port 0 by default), run on its own event loop in a background
thread, so that a benchmark or a test can drive it with plain synchronous stubs from many
threads in the same process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import grpc

from asr.v1 import asr_pb2_grpc
from server.app import ServerHandle, build_server
from server.config import Settings
from server.models.base import SpeechModel


class EmbeddedServer:
    def __init__(self, settings: Settings, model: SpeechModel | Callable[[], SpeechModel]) -> None:
        self.settings = settings.replace(host="127.0.0.1", port=0, metrics_port=-1)
        self._model = model
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self.handle: ServerHandle | None = None
        self._thread = threading.Thread(target=self._main, name="test-server", daemon=True)

    def start(self) -> EmbeddedServer:
        """Start, and return once the model is being served (SERVING)."""
        self._thread.start()
        if not self._ready.wait(600):
            raise TimeoutError("server did not start")
        if self._error is not None:
            raise self._error
        return self

    @property
    def address(self) -> str:
        assert self.handle is not None
        return f"127.0.0.1:{self.handle.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ],
        )

    def stub(self) -> asr_pb2_grpc.SpeechStub:
        return asr_pb2_grpc.SpeechStub(self.channel())

    def call(self, fn: Callable[[ServerHandle], object]) -> object:
        """Run fn(handle) on the server's loop; await it if it returns an awaitable."""
        assert self._loop is not None and self.handle is not None
        handle = self.handle

        async def run() -> object:
            result = fn(handle)
            if asyncio.iscoroutine(result):
                return await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(600)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as err:  # surfaced by start()
            self._error = err
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.handle = await build_server(self.settings)
        await self.handle.server.start()
        model = self._model
        if not isinstance(model, SpeechModel):
            model = await self._loop.run_in_executor(self.handle.worker, model)
        await self.handle.serve_model(model)
        self._ready.set()
        await self._stop.wait()
        await self.handle.drain_and_stop(5.0)
