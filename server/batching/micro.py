"""An asyncio micro-batcher (`--engine generate`): many concurrent callers, one batch function
(the model's `run_batch`: transformers' `generate`), one worker thread.

- The batch window opens at the first arrival: a batch runs when it holds `max_batch_size`
  items or `max_wait_ms` has passed since its oldest item arrived (monotonic clock).
- The queue is bounded: `submit_many` raises QueueFullError when the items don't fit, all or
  nothing, so a request is never half-queued.
- Background items (streams' interim re-decodes) wait behind everything else: a batch takes
  urgent items first, so interims never delay a final or a unary request.
- Items whose caller went away (future cancelled) or whose deadline passed are dropped before
  the batch runs, so they cost no model time.
- The batch function maps a list to a list of the same length, checked; a batch that raises is
  retried in pieces (`run_in_pieces`), so only the items that fail alone fail, and the loop
  goes on. An unrecoverable error stops the batcher (`on_fatal`).
- The batch function runs on the executor given (one thread: the owner of the accelerator);
  the event loop never blocks on it. Results are set only on futures that are not done.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from server.batching.base import (
    Batched,
    BatchStats,
    EngineStats,
    expired_in_queue,
    gather_or_cancel,
    queue_full,
    run_in_pieces,
    settle,
    wait_idle,
)
from server.config import Settings, SettingsError, check_bounds
from server.errors import UnavailableError, UnrecoverableError

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Batched[Out]]
    enqueued: float
    deadline: float | None = None  # monotonic seconds


@dataclass
class BatcherConfig:
    """The micro-batcher's settings: the `Settings` fields of the same names, with their
    bounds (see `server.config`)."""

    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_queue_size: int = 256
    # A batch that isn't full may wait up to this long (from its oldest item) for requests that
    # have arrived and are still being decoded, instead of leaving without them.
    max_prepare_wait_ms: float = 100.0

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.max_queue_size < self.max_batch_size:
            raise SettingsError("max_queue_size must be >= max_batch_size")

    @classmethod
    def from_settings(cls, s: Settings) -> BatcherConfig:
        return cls(s.max_batch_size, s.max_wait_ms, s.max_queue_size, s.max_prepare_wait_ms)


@dataclass
class MicroBatcher(Generic[In, Out]):
    batch_fn: Callable[[list[In]], Sequence[Out]]
    executor: Executor
    config: BatcherConfig = field(default_factory=BatcherConfig)
    on_batch: Callable[[BatchStats], None] | None = None
    # Called once (on the event loop) when the batcher can't go on: an UnrecoverableError
    # from the model, or its own loop crashing. The app then drains and exits non-zero.
    on_fatal: Callable[[Exception], None] | None = None

    engine = "generate"  # not a field: what GetServerInfo reports

    def __post_init__(self) -> None:
        self._queue: collections.deque[_Pending[In, Out]] = collections.deque()
        self._background: collections.deque[_Pending[In, Out]] = collections.deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._accepting = True
        self._running = 0  # items in the batch now on the worker
        self._batches_run = 0
        self._preparing = 0  # requests that arrived and are being decoded, not yet queued
        self._idle = asyncio.Event()  # set while nothing is queued or running
        self._idle.set()
        self.failed: Exception | None = None  # the unrecoverable error that stopped it
        self._current: list[_Pending[In, Out]] = []  # the batch on the worker now

    # -- callers -------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Items waiting for a batch (not counting the batch now running)."""
        return len(self._queue) + len(self._background)

    @property
    def in_flight(self) -> int:
        return self.depth + self._running

    async def submit(self, item: In, deadline: float | None = None) -> Batched[Out]:
        return (await self.submit_many([item], deadline))[0]

    async def submit_many(
        self, items: list[In], deadline: float | None = None, background: bool = False
    ) -> list[Batched[Out]]:
        """Queue all items or none; wait for all their results. Cancelling the caller cancels
        its queued items, which are then skipped before inference."""
        return await gather_or_cancel(self.enqueue(items, deadline, background))

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Announce a request that has arrived and is being prepared (decoding, features):
        a batch that isn't full waits for it, up to max_prepare_wait_ms. Without this, the
        closed-loop clients of a finished batch come back a few milliseconds apart, the
        first ones leave in a small batch and the batch size never recovers."""
        self._preparing += 1
        try:
            yield
        finally:
            self._preparing -= 1
            self._arrived.set()

    def enqueue(
        self, items: list[In], deadline: float | None = None, background: bool = False
    ) -> list[asyncio.Future[Batched[Out]]]:
        """Queue items without waiting (streaming uses this); the futures carry the results."""
        if self.failed is not None:
            raise UnavailableError(
                f"server is restarting after an unrecoverable error: {self.failed}"
            )
        if not self._accepting:
            raise UnavailableError("server is shutting down and takes no new requests")
        if self.depth + len(items) > self.config.max_queue_size:
            raise queue_full(self.depth, self.config.max_queue_size, len(items))
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        pendings = [_Pending(item, loop.create_future(), now, deadline) for item in items]
        (self._background if background else self._queue).extend(pendings)
        self._idle.clear()
        self._arrived.set()
        return [p.future for p in pendings]

    async def warmup(self, batch_sizes: list[int]) -> None:
        """Nothing beyond the model's own warm-up (`SpeechModel.warmup`, run when loading)."""

    def stats(self) -> EngineStats | None:
        return None  # the model-call metrics (on_batch) are all it has

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")
            self._task.add_done_callback(self._loop_done)

    def _loop_done(self, task: asyncio.Task[None]) -> None:
        """The loop only ends by stop() (cancelled) or by a bug: a bug is fatal, not retried
        (a restarted loop would meet the same state and crash again)."""
        if task.cancelled() or task.exception() is None:
            return
        err = task.exception()
        log.error("batcher loop crashed", exc_info=err)
        self._fail_fatal(UnrecoverableError(f"batcher loop crashed: {type(err).__name__}"), [])

    def _fail_fatal(self, error: UnrecoverableError, running: list[_Pending[In, Out]]) -> None:
        """Stop taking work; fail the running batch and everything queued with `error`."""
        if self.failed is None:
            self.failed = error
            if self.on_fatal is not None:
                self.on_fatal(error)
        self._accepting = False
        for p in [*running, *self._queue, *self._background]:
            settle(p.future, error)
        self._queue.clear()
        self._background.clear()
        self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting; wait up to timeout_s for queued and running items. True if drained."""
        self._accepting = False
        self._arrived.set()
        return await wait_idle(self._idle, timeout_s)

    async def stop(self) -> None:
        self._accepting = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for p in self._current:  # the batch on the worker when it stopped: nobody will hear
            settle(p.future, UnavailableError("server stopped while this request was decoding"))
        for p in [*self._queue, *self._background]:
            settle(p.future, UnavailableError("server stopped before this request ran"))
        self._current = []
        self._queue.clear()
        self._background.clear()

    # -- the loop ------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if not self.depth:
                self._idle.set()
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._wait_for_batch()
            batch = self._take_batch()
            if batch:
                await self._run(batch)

    async def _wait_for_batch(self) -> None:
        """Wait until the batch is full or the oldest item has waited max_wait_ms (or, while
        announced requests are still being prepared, max_prepare_wait_ms)."""
        max_wait_s = self.config.max_wait_ms / 1000
        prepare_wait_s = max(max_wait_s, self.config.max_prepare_wait_ms / 1000)
        while self.depth < self.config.max_batch_size and self._accepting:
            oldest = min(q[0].enqueued for q in (self._queue, self._background) if q)
            wait_s = prepare_wait_s if self._preparing else max_wait_s
            remaining = oldest + wait_s - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take_batch(self) -> list[_Pending[In, Out]]:
        batch: list[_Pending[In, Out]] = []
        now = time.monotonic()
        while self.depth and len(batch) < self.config.max_batch_size:
            p = (self._queue or self._background).popleft()
            if p.future.done():  # the caller went away: no model time for it
                continue
            if p.deadline is not None and now >= p.deadline:
                settle(p.future, expired_in_queue(now - p.enqueued))
                continue
            batch.append(p)
        return batch

    async def _run(self, batch: list[_Pending[In, Out]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self._running = len(batch)
        self._current = batch
        items = [p.item for p in batch]
        try:
            pieces = await loop.run_in_executor(self.executor, run_in_pieces, self.batch_fn, items)
        except UnrecoverableError as err:
            log.error("unrecoverable error in a batch of %d: %s", len(batch), err)
            self._fail_fatal(err, batch)
            return
        finally:
            self._running = 0  # _current stays set if stop() cancelled us: it resolves them
        self._current = []
        infer_s = time.monotonic() - started
        self._batches_run += 1
        queue_s = [started - p.enqueued for p in batch]
        for p, out, waited in zip(batch, pieces.outcomes, queue_s, strict=True):
            settle(p.future, out if isinstance(out, Exception) else Batched(
                out, waited, infer_s, len(batch), self._batches_run
            ))  # fmt: skip
        if self.on_batch is not None:
            ok = not pieces.failures
            self.on_batch(BatchStats(len(batch), queue_s, infer_s, ok, pieces.failures))
