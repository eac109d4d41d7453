"""The micro-batcher: flush on size and on time, order, cancellation, deadlines, queue bound,
error fan-out. The batch function is gated with threading events, never timed with sleeps."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.batching.base import BatchStats
from server.batching.micro import BatcherConfig, MicroBatcher
from server.errors import BatchError, DeadlineExceededError, QueueFullError, UnavailableError


class Recorder:
    """A batch function that records its batches and can be held at a gate."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail: Exception | None = None
        self.wrong_length = False

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        assert self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        out = [i * 10 for i in items]
        return out[:-1] if self.wrong_length else out


@pytest.fixture
def worker():
    pool = ThreadPoolExecutor(1, thread_name_prefix="model-worker")
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


async def _started(fn: Recorder) -> None:
    assert await asyncio.to_thread(fn.entered.wait, 10)
    fn.entered.clear()


def make(fn: Recorder, worker, size=4, wait_ms=10_000.0, queue=16, stats=None):
    b = MicroBatcher(fn, worker, BatcherConfig(size, wait_ms, queue), on_batch=stats)
    b.start()
    return b


async def test_flushes_when_full_without_waiting_for_the_timer(worker):
    fn = Recorder()
    b = make(fn, worker, size=4, wait_ms=10_000)  # the timer would take 10 s (the most allowed)
    results = await asyncio.wait_for(asyncio.gather(*(b.submit(i) for i in range(4))), 10)
    assert [r.value for r in results] == [0, 10, 20, 30]
    assert fn.batches == [[0, 1, 2, 3]]
    assert {r.batch_size for r in results} == {4}
    await b.stop()


async def test_flushes_on_time_when_not_full(worker):
    fn = Recorder()
    b = make(fn, worker, size=8, wait_ms=20)
    started = time.monotonic()
    results = await asyncio.gather(b.submit(1), b.submit(2))
    assert [r.value for r in results] == [10, 20]
    assert fn.batches == [[1, 2]]
    assert time.monotonic() - started >= 0.02  # the window stayed open its max_wait_ms
    await b.stop()


async def test_arrivals_during_a_batch_form_the_next_batch_in_order(worker):
    fn = Recorder()
    fn.gate.clear()
    b = make(fn, worker, size=3, wait_ms=5)
    first = asyncio.ensure_future(b.submit(0))
    await _started(fn)
    rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0)  # let them enqueue (no timing relied on: the gate holds the worker)
    fn.gate.set()
    values = [r.value for r in await asyncio.gather(first, *rest)]
    assert values == [0, 10, 20, 30, 40, 50]
    assert fn.batches == [[0], [1, 2, 3], [4, 5]]
    await b.stop()


async def test_cancelled_request_is_dropped_before_inference(worker):
    fn = Recorder()
    fn.gate.clear()
    b = make(fn, worker, size=4, wait_ms=5)
    first = asyncio.ensure_future(b.submit(0))
    await _started(fn)
    doomed = asyncio.ensure_future(b.submit(99))
    kept = asyncio.ensure_future(b.submit(1))
    await asyncio.sleep(0)
    doomed.cancel()
    fn.gate.set()
    assert (await kept).value == 10
    await first
    assert all(99 not in batch for batch in fn.batches)
    await b.stop()


async def test_expired_deadline_fails_with_deadline_exceeded_before_inference(worker):
    fn = Recorder()
    fn.gate.clear()
    b = make(fn, worker, size=4, wait_ms=5)
    first = asyncio.ensure_future(b.submit(0))
    await _started(fn)
    expired = asyncio.ensure_future(b.submit(7, deadline=time.monotonic() - 1))
    await asyncio.sleep(0)
    fn.gate.set()
    with pytest.raises(DeadlineExceededError, match="deadline"):
        await expired
    await first
    assert all(7 not in batch for batch in fn.batches)
    await b.stop()


async def test_queue_full_is_all_or_nothing(worker):
    fn = Recorder()
    fn.gate.clear()
    b = make(fn, worker, size=2, wait_ms=0, queue=4)
    running = asyncio.ensure_future(b.submit_many([0, 1]))
    await _started(fn)
    queued = asyncio.ensure_future(b.submit_many([2, 3, 4]))
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError, match="queue is full"):
        await b.submit_many([5, 6])  # 3 waiting + 2 > 4: none of them is queued
    assert b.depth == 3
    fn.gate.set()
    assert [r.value for r in await queued] == [20, 30, 40]
    await running
    assert all(5 not in batch and 6 not in batch for batch in fn.batches)
    await b.stop()


async def test_exception_fails_only_its_own_batch(worker):
    fn = Recorder()
    fn.fail = RuntimeError("boom")
    seen: list[BatchStats] = []
    b = make(fn, worker, size=2, wait_ms=0, stats=seen.append)
    results = await asyncio.gather(b.submit_many([1, 2]), return_exceptions=True)
    assert isinstance(results[0], BatchError)
    assert "RuntimeError" in str(results[0])
    fn.fail = None
    assert [r.value for r in await b.submit_many([3, 4])] == [30, 40]
    assert [s.ok for s in seen] == [False, True]
    await b.stop()


async def test_length_mismatch_fails_the_batch(worker):
    fn = Recorder()
    fn.wrong_length = True
    b = make(fn, worker, size=2, wait_ms=0)
    with pytest.raises(BatchError, match="results for a batch of"):
        await b.submit_many([1, 2])
    await b.stop()


async def test_batch_function_runs_only_on_the_worker_thread(worker):
    threads: set[str] = set()

    def fn(items: list[int]) -> list[int]:
        threads.add(threading.current_thread().name)
        return items

    b = MicroBatcher(fn, worker, BatcherConfig(4, 1, 16))
    b.start()
    await asyncio.gather(*(b.submit(i) for i in range(10)))
    assert len(threads) == 1 and next(iter(threads)).startswith("model-worker")
    await b.stop()


async def test_drain_finishes_queued_work_and_refuses_new(worker):
    fn = Recorder()
    fn.gate.clear()
    b = make(fn, worker, size=2, wait_ms=10_000)
    pending = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
    await _started(fn)
    drain = asyncio.ensure_future(b.drain(10))
    await asyncio.sleep(0)
    with pytest.raises(UnavailableError):
        await b.submit(9)
    fn.gate.set()
    assert await drain is True
    assert [p.result().value for p in pending] == [0, 10, 20]
    await b.stop()


def test_config_validation():
    with pytest.raises(ValueError, match="max_batch_size"):
        BatcherConfig(0, 1, 1)
    with pytest.raises(ValueError, match="max_queue_size"):
        BatcherConfig(8, 1, 4)


async def test_background_items_wait_behind_urgent_ones(worker):
    fn = Recorder()
    fn.gate.clear()
    b = make(fn, worker, size=2, wait_ms=0)
    first = asyncio.ensure_future(b.submit(0))
    await _started(fn)
    interim = asyncio.ensure_future(b.submit_many([7], background=True))
    await asyncio.sleep(0)
    finals = asyncio.ensure_future(b.submit_many([1, 2]))
    await asyncio.sleep(0)
    fn.gate.set()
    await asyncio.gather(first, interim, finals)
    assert fn.batches == [[0], [1, 2], [7]]  # queued later, served first
    await b.stop()


async def test_a_batch_waits_for_requests_still_being_prepared(worker):
    fn = Recorder()
    b = MicroBatcher(fn, worker, BatcherConfig(4, 0, 16, max_prepare_wait_ms=10_000))
    b.start()
    with b.preparing():  # a second request has arrived and is still decoding its audio
        first = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.05)  # long past max_wait_ms=0: without the announcement, [1] runs
        second = asyncio.ensure_future(b.submit(2))
        await asyncio.sleep(0)
    assert [(await first).value, (await second).value] == [10, 20]
    assert fn.batches == [[1, 2]]
    await b.stop()


async def test_without_announcements_the_window_closes_at_max_wait(worker):
    fn = Recorder()
    b = MicroBatcher(fn, worker, BatcherConfig(4, 0, 16, max_prepare_wait_ms=10_000))
    b.start()
    first = asyncio.ensure_future(b.submit(1))
    await asyncio.to_thread(fn.entered.wait, 10)  # it ran alone, without waiting
    assert (await first).value == 10 and fn.batches == [[1]]
    await b.stop()


async def test_stop_resolves_the_batch_that_is_running(worker):
    """A batch on the worker when the batcher stops: its callers hear UNAVAILABLE at once
    instead of waiting on futures nobody will set."""
    fn = Recorder()
    fn.gate.clear()
    b = make(fn, worker, size=2, wait_ms=0)
    running = b.enqueue([1, 2])
    await _started(fn)  # the batch is on the worker, held at the gate
    await b.stop()
    for fut in running:
        with pytest.raises(UnavailableError, match="while this request was decoding"):
            await asyncio.wait_for(fut, 5)
    fn.gate.set()
