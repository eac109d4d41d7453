"""What the three protobuf edges (asr.v1, Google, Riva) share that is not speech: a call's
time left, Durations, and the framing of a stream (its config first, then audio only).

The stream helpers work on any API whose stream messages are a `streaming_request` oneof of
`streaming_config` and `audio_content`, as asr.v1's, Google's and Riva's are.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from server.errors import DeadlineExceededError, InvalidArgumentError


def time_remaining_s(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left before the client's deadline; None when it set none."""
    return context.time_remaining()


def audio_time(seconds: float) -> Duration:
    """A position or length in the audio, to the millisecond: word times come from float32
    sums ("1.059999943s"), and no client needs finer than a millisecond of audio."""
    d = Duration()
    d.FromMilliseconds(round(seconds * 1000))
    return d


def duration(seconds: float) -> Duration:
    """A measured server time, to the microsecond."""
    d = Duration()
    d.FromMicroseconds(round(seconds * 1e6))
    return d


async def first_message(request_iterator: AsyncIterator[Any], timeout_s: float) -> Any | None:
    """A stream's first message, which must carry the config and come within `timeout_s`
    (--stream-idle-timeout-s); None if the client closed without sending anything."""
    try:
        first = await asyncio.wait_for(anext(aiter(request_iterator), None), timeout_s)
    except asyncio.TimeoutError:
        raise DeadlineExceededError(
            f"no streaming_config within {timeout_s:g} s of opening the stream"
        ) from None
    if first is not None and first.WhichOneof("streaming_request") != "streaming_config":
        raise InvalidArgumentError(
            "the first message must carry streaming_config; audio_content comes after it"
        )
    return first


async def audio_chunks(request_iterator: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    """The audio of a stream after its first message; protocol errors end the stream."""
    async for request in request_iterator:
        kind = request.WhichOneof("streaming_request")
        if kind == "streaming_config":
            raise InvalidArgumentError("streaming_config may only be sent once, first")
        if kind is None:
            raise InvalidArgumentError("a stream message carries neither config nor audio")
        yield request.audio_content
