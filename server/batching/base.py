"""What every batching engine shares: the interface callers use, the result and stats types,
and the helpers that keep the batcher contract (Ray Serve's rules) in one place.

- `WindowBatcher`: bounded all-or-nothing queueing, background priority, cancellation and
  deadlines, announced requests, warm-up, counters, and a drain on shutdown. The recognizer,
  the streams and the app use only this; `MicroBatcher` (`server.batching.micro`) and
  `ContinuousEngine` (`server.batching.continuous`) provide it.
- `run_in_pieces`: a model call made so that one request can't fail another's (out of memory:
  halves; another error: each item alone; an unrecoverable error: not retried).
- `settle`: an outcome is set only on a future that is not done; `gather_or_cancel`,
  `queue_full`, `wait_idle`: waiting, the queue-full error and the drain, alike everywhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from server.errors import (
    BatchError,
    DeadlineExceededError,
    DeviceOutOfMemoryError,
    QueueFullError,
    UnrecoverableError,
)
from server.models.base import WindowResult, WindowTask

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(frozen=True)
class Batched(Generic[Out]):
    """A result with the server's account of how it was produced."""

    value: Out
    queue_s: float  # from submit to the start of its batch
    infer_s: float  # the batch function's wall time
    batch_size: int
    batch_id: int  # tells apart the batches that served the windows of one request
    # How infer_s splits (the continuous engine fills these; the micro-batcher's generate call
    # is all decode): its own encoder pass (None: not measured apart), and the time it stood
    # still while other windows' passes ran. decode_s is the rest.
    encode_s: float | None = None
    held_s: float = 0.0

    @property
    def decode_s(self) -> float:
        return max(0.0, self.infer_s - (self.encode_s or 0.0) - self.held_s)


@dataclass(frozen=True)
class BatchStats:
    """Handed to the `on_batch` hook after every batch, for metrics."""

    size: int
    queue_s: list[float]
    infer_s: float
    ok: bool  # no model call of this batch raised
    failures: int = 0  # model calls that raised (a batch retried in pieces may have several)
    kind: str = "batch"  # "batch" (a model call) or "step" (a failed continuous decode step)


class _Limits(Protocol):
    @property
    def max_batch_size(self) -> int:
        """Windows that make a full batch: more waiting means best-effort work should wait."""
        ...


class WindowBatcher(Protocol):
    """What callers of a batcher rely on: bounded all-or-nothing queueing, background
    priority, cancellation and deadlines, announced requests, and a drain on shutdown."""

    @property
    def engine(self) -> str:
        """The `--engine` name this batcher implements."""
        ...

    @property
    def config(self) -> _Limits: ...

    @property
    def depth(self) -> int: ...

    @property
    def in_flight(self) -> int: ...

    async def submit_many(
        self, items: list[WindowTask], deadline: float | None = None, background: bool = False
    ) -> list[Batched[WindowResult]]: ...

    def enqueue(
        self, items: list[WindowTask], deadline: float | None = None, background: bool = False
    ) -> list[asyncio.Future[Batched[WindowResult]]]: ...

    def preparing(self) -> AbstractContextManager[None]: ...

    def start(self) -> None: ...

    async def warmup(self, batch_sizes: list[int]) -> None:
        """Run through the engine once per batch size before SERVING (what the model's own
        warm-up doesn't cover: the engine's caches and kernels)."""
        ...

    def stats(self) -> EngineStats | None:
        """The engine's running counters for metrics (None: it keeps none)."""
        ...

    async def drain(self, timeout_s: float) -> bool: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class EngineStats:
    """The continuous engine's counters for metrics: gauges (pending, active), running totals."""

    pending: int  # windows waiting to join
    active: int  # sequences in the decode batch now
    decode_steps: int
    step_rows: int  # sum over steps of the rows in each step (mean batch = step_rows / steps)
    tokens_generated: int  # one per row per step, and each sequence's first token
    sequences_finished: int
    encoder_batches: int
    encoder_windows: int
    fallback_windows: int  # decoded by model.run_batch (options the engine doesn't cover)
    join_s: float  # time in encoder + prompt passes
    decode_s: float  # time in decode steps
    fallback_s: float  # time in model.run_batch


def settle(future: asyncio.Future[Any], outcome: Any) -> None:
    """Set a result or an exception (an `Exception` outcome) on a future that is not done."""
    if future.done():
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


async def gather_or_cancel(futures: list[asyncio.Future[Batched[Out]]]) -> list[Batched[Out]]:
    """All the results, in order; if the caller is cancelled (or one fails), the rest are
    cancelled, so no engine spends model time on a request nobody waits for."""
    try:
        return list(await asyncio.gather(*futures))
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise


def queue_full(depth: int, limit: int, needed: int) -> QueueFullError:
    return QueueFullError(
        f"server queue is full ({depth} of {limit} windows waiting, this request needs "
        f"{needed}); retry with backoff"
    )


@dataclass
class Pieces(Generic[Out]):
    """What `run_in_pieces` gives back: one outcome per item, and the model calls that raised."""

    outcomes: list[Out | Exception]
    failures: int = 0


def run_in_pieces(batch_fn: Callable[[list[In]], Sequence[Out]], items: list[In]) -> Pieces[Out]:
    """`batch_fn(items)`, made so that one request can't fail another's (worker thread only).

    Out of memory: the batch is retried in halves, down to single items; an item that runs
    out of memory alone gets DeviceOutOfMemoryError (RESOURCE_EXHAUSTED). Any other error
    (or a result list of the wrong length): each item is retried alone, so only the items
    that fail alone fail (BatchError). UnrecoverableError is not retried: it propagates."""
    try:
        outs = list(batch_fn(items))
        if len(outs) != len(items):
            raise BatchError(f"model returned {len(outs)} results for a batch of {len(items)}")
        return Pieces(list(outs))
    except UnrecoverableError:
        raise
    except DeviceOutOfMemoryError as err:
        if len(items) == 1:
            return Pieces([out_of_memory_alone(err)], 1)
        log.warning("out of memory on a batch of %d: retrying in halves", len(items))
        half = (len(items) + 1) // 2
        pieces = [run_in_pieces(batch_fn, items[:half]), run_in_pieces(batch_fn, items[half:])]
    except Exception as err:
        if len(items) == 1:
            log.exception("model call failed on one window")
            return Pieces([as_batch_error(err)], 1)
        log.warning("batch of %d failed (%s): retrying each window alone", len(items), err)
        pieces = [run_in_pieces(batch_fn, [item]) for item in items]
    outcomes = [o for p in pieces for o in p.outcomes]
    return Pieces(outcomes, 1 + sum(p.failures for p in pieces))


def as_batch_error(err: Exception) -> BatchError:
    if isinstance(err, BatchError):
        return err
    return BatchError(f"model failed on this window: {type(err).__name__}")


def out_of_memory_alone(err: DeviceOutOfMemoryError) -> DeviceOutOfMemoryError:
    return DeviceOutOfMemoryError(
        f"{err}, even alone: the server has no memory to spare for it now; retry later or "
        "send shorter audio"
    )


def expired_in_queue(waited_s: float) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"deadline passed after {waited_s:.3f} s in the queue, before the model could run it"
    )


async def wait_idle(idle: asyncio.Event, timeout_s: float) -> bool:
    """Wait up to timeout_s for `idle`; True if it was set in time."""
    try:
        await asyncio.wait_for(idle.wait(), timeout_s)
    except asyncio.TimeoutError:
        return False
    return True
