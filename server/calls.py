"""Every call to our speech services, from the moment gRPC routes it to the moment it ends.

The error interceptor opens a `Call` for each one (before its request is read), so that:
- the drain on SIGTERM knows when the last response of our services has been written
  (`OpenCalls.idle()`), and can then end what is left (health Watch streams, reflection)
  instead of holding them for the whole grace period;
- each call is counted once with the status its client saw, including calls cut short before
  or while their request arrives: their deadline, gRPC's own refusals (an oversize message,
  `maximum_concurrent_rpcs`), a client that went away.

Deadlines are judged from the call's own deadline, not from `time_remaining()` when the cancel
arrives: a client's timer fires first, and its cancel reaches us while a few ms remain.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

# A cancel this close to the call's deadline is the client's deadline firing (its timer starts
# before the request is sent, ours when the headers arrive: the two differ by the transit).
DEADLINE_TOLERANCE_S = 0.1
# gRPC refuses an oversize message by ending the request stream and cancelling the call in the
# same breath; a client that half-closes and then cancels does so much later.
REFUSAL_WINDOW_S = 0.5


@dataclass
class Call:
    """One call to a speech method, as the interceptor sees it."""

    method: str
    started: float = field(default_factory=time.monotonic)
    begun: bool = False  # the handler ran: gRPC handed us the call's context
    deadline: float | None = None  # monotonic, from the call's own deadline
    input_ended_at: float | None = None  # the request stream ended (half-close or refusal)
    # The request stream ended because the call was over (not a half-close): what its client saw.
    cut: grpc.StatusCode | None = None
    code: grpc.StatusCode | None = None  # the status counted, set once

    def begin(self, time_remaining: float | None) -> None:
        self.begun = True
        if time_remaining is not None:
            self.deadline = time.monotonic() + time_remaining

    def input_ended(self) -> None:
        self.input_ended_at = time.monotonic()

    def late(self, now: float | None = None, tolerance_s: float = 0.0) -> bool:
        """The call's deadline has passed: its client saw DEADLINE_EXCEEDED, whatever the
        server answers."""
        now = time.monotonic() if now is None else now
        return self.deadline is not None and now >= self.deadline - tolerance_s

    def cut_short(self, now: float | None = None) -> grpc.StatusCode:
        """What the client saw of a call that ended without a status of ours."""
        if self.cut is not None:  # judged when the request stream was cut
            return self.cut
        now = time.monotonic() if now is None else now
        if not self.begun:  # gRPC answered before any handler ran: maximum_concurrent_rpcs
            return grpc.StatusCode.RESOURCE_EXHAUSTED
        if self.late(now, DEADLINE_TOLERANCE_S):  # a cancel this close is the deadline's
            return grpc.StatusCode.DEADLINE_EXCEEDED
        if self.input_ended_at is not None and now - self.input_ended_at <= REFUSAL_WINDOW_S:
            return grpc.StatusCode.RESOURCE_EXHAUSTED  # a message over the size limit
        return grpc.StatusCode.CANCELLED


class OpenCalls:
    """How many calls of our services are open, and an event for when none is."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def open(self, on_end: Callable[[], None]) -> None:
        """Track the calling RPC's task (call from inside it: the interceptor runs there, before
        the request is read); `on_end` runs once its final status has been sent, or it ended."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("OpenCalls.open() is called from an RPC's task")
        self.count += 1
        self._idle.clear()

        def ended(_: asyncio.Task[object]) -> None:
            on_end()  # first: once idle, every call has been counted
            self.count -= 1
            if self.count == 0:
                self._idle.set()

        task.add_done_callback(ended)

    async def idle(self, timeout_s: float) -> bool:
        """Wait until no call is open, at most `timeout_s`; True if none is."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout_s))
        except asyncio.TimeoutError:
            return False
        return True
