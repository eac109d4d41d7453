"""Accelerator faults, injected on the CPU: out of memory (torch.cuda.OutOfMemoryError can be
raised without a GPU) is retried in smaller pieces and sheds only what doesn't fit, with
RESOURCE_EXHAUSTED; an unrecoverable device error stops the engine, health goes NOT_SERVING
and the server exits non-zero; a crashing engine loop is not resubmitted."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.batching.base import BatchStats, run_in_pieces
from server.batching.continuous import ContinuousEngine, EngineConfig
from server.batching.micro import BatcherConfig, MicroBatcher
from server.errors import (
    BatchError,
    DeviceFaultError,
    DeviceOutOfMemoryError,
    UnavailableError,
    UnrecoverableError,
)
from server.metrics import Metrics
from server.models.base import DecodeOptions
from server.models.device import device_errors, is_device_fault
from tests.unit.test_continuous import TinyWhisper, assert_same, reference, task, windows

CPU = torch.device("cpu")
ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


def oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.fixture
def worker():
    pool = ThreadPoolExecutor(1, thread_name_prefix="model-worker")
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


# -- the error classes -------------------------------------------------------------------------
def test_device_errors_translate_torch_failures() -> None:
    cases: list[tuple[Exception, type[Exception], str]] = [
        (oom(), DeviceOutOfMemoryError, "cpu ran out of memory in a step"),
        (RuntimeError(ILLEGAL_ACCESS), DeviceFaultError, "illegal memory access"),
        (RuntimeError("CUDA error: device-side assert triggered"), DeviceFaultError, "assert"),
        (ValueError("a bug"), ValueError, "a bug"),  # anything else passes through unchanged
    ]
    for raised, expected, message in cases:
        with pytest.raises(expected, match=message), device_errors(CPU, "a step"):
            raise raised
    assert not is_device_fault(RuntimeError("shape mismatch"))


# -- run_in_pieces: the helper both engines use for model.run_batch ----------------------------
def test_out_of_memory_retries_in_halves_and_sheds_only_what_does_not_fit() -> None:
    calls: list[list[int]] = []

    def batch_fn(items: list[int]) -> list[int]:
        calls.append(items)
        if len(items) > 2 or items == [7]:  # more than 2 don't fit; 7 doesn't fit even alone
            raise DeviceOutOfMemoryError("cuda:0 ran out of memory in a batch")
        return [i * 10 for i in items]

    pieces = run_in_pieces(batch_fn, [1, 2, 3, 4, 5, 6, 7])
    outs = pieces.outcomes
    assert outs[:6] == [10, 20, 30, 40, 50, 60]
    assert isinstance(outs[6], DeviceOutOfMemoryError) and "even alone" in str(outs[6])
    assert calls[0] == [1, 2, 3, 4, 5, 6, 7] and max(len(c) for c in calls[1:]) <= 4
    assert pieces.failures == sum(1 for c in calls if len(c) > 2 or c == [7])


def test_an_error_in_a_batch_fails_only_the_item_that_fails_alone() -> None:
    def batch_fn(items: list[int]) -> list[int]:
        if 3 in items:
            raise ValueError("bad window")
        return [i * 10 for i in items]

    outs = run_in_pieces(batch_fn, [1, 2, 3, 4]).outcomes
    assert outs[:2] == [10, 20] and outs[3] == 40
    assert isinstance(outs[2], BatchError)


def test_unrecoverable_errors_are_not_retried() -> None:
    calls = []

    def batch_fn(items: list[int]) -> list[int]:
        calls.append(items)
        raise DeviceFaultError("cuda:0 failed")

    with pytest.raises(DeviceFaultError):
        run_in_pieces(batch_fn, [1, 2, 3])
    assert len(calls) == 1


# -- the generate engine (micro-batcher) -------------------------------------------------------
async def test_micro_batcher_out_of_memory_gives_resource_exhausted_to_the_one_too_big(
    worker,
) -> None:
    def batch_fn(items: list[int]) -> list[int]:
        with device_errors(CPU, "a batch"):
            if len(items) > 1 or items == [3]:
                raise oom()
            return [i * 10 for i in items]

    stats: list[BatchStats] = []
    b: MicroBatcher[int, int] = MicroBatcher(
        batch_fn, worker, BatcherConfig(4, 10_000), on_batch=stats.append
    )
    b.start()
    futures = b.enqueue([1, 2, 3, 4])
    done = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
    assert [d.value for d in done if not isinstance(d, Exception)] == [10, 20, 40]
    assert isinstance(done[2], DeviceOutOfMemoryError)
    metrics = Metrics()
    metrics.observe_batch(stats[0])
    assert metrics.batch_failures._value.get() == stats[0].failures > 0
    await b.stop()


async def test_micro_batcher_device_fault_stops_it_and_reports_once(worker) -> None:
    fatal: list[Exception] = []

    def batch_fn(items: list[int]) -> list[int]:
        with device_errors(CPU, "a batch"):
            raise RuntimeError(ILLEGAL_ACCESS)

    b: MicroBatcher[int, int] = MicroBatcher(
        batch_fn, worker, BatcherConfig(2, 10_000), on_fatal=fatal.append
    )
    b.start()
    first = b.enqueue([1, 2])
    queued = b.enqueue([3])
    done = await asyncio.wait_for(asyncio.gather(*first, *queued, return_exceptions=True), 30)
    assert all(isinstance(d, DeviceFaultError) for d in done)  # running and queued alike
    assert len(fatal) == 1
    with pytest.raises(UnavailableError, match="unrecoverable"):
        b.enqueue([4])
    await b.stop()


# -- the continuous engine ---------------------------------------------------------------------
class EncoderFails:
    """Wraps the tiny model's encoder: raises `error(batch)` when it returns an exception."""

    def __init__(self, model: TinyWhisper, error: Any) -> None:
        self.encoder = model.model.get_encoder()
        self.error = error
        self.batches: list[int] = []
        model.model.get_encoder = lambda: self  # type: ignore[method-assign]

    def __call__(self, features: torch.Tensor) -> Any:
        self.batches.append(features.shape[0])
        err = self.error(features)
        if err is not None:
            raise err
        return self.encoder(features)


async def test_encoder_out_of_memory_is_retried_in_halves(worker) -> None:
    model = TinyWhisper()
    feats = windows(6, seed=21)
    too_big = feats[4]
    encoder = EncoderFails(
        model,
        lambda x: (
            oom()
            if x.shape[0] > 2 or any(torch.equal(row, torch.from_numpy(too_big)) for row in x)
            else None
        ),
    )
    engine = ContinuousEngine(model, worker, EngineConfig(max_active=8, max_batch_size=6))
    engine.start()
    futures = engine.enqueue([task(f) for f in feats])
    done = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 60)
    for i, (got, features) in enumerate(zip(done, feats, strict=True)):
        if i == 4:
            assert isinstance(got, DeviceOutOfMemoryError) and "even alone" in str(got)
        else:
            assert not isinstance(got, Exception), got
            assert_same(got.value, reference(model, features, DecodeOptions()))
    assert encoder.batches[0] == 6 and max(encoder.batches[1:]) <= 3
    assert engine.in_flight == 0
    await engine.stop()


class StepOOM:
    """Wraps the decoder's step: out of memory for pieces of more than `rows` rows."""

    def __init__(self, engine: ContinuousEngine, rows: int) -> None:
        self.step = engine.runtime.decoder.step
        self.rows = rows
        self.pieces: list[int] = []
        engine.runtime.decoder.step = self  # type: ignore[method-assign]

    def __call__(self, input_ids: torch.Tensor, first: int = 0) -> torch.Tensor:
        self.pieces.append(input_ids.shape[0])
        if input_ids.shape[0] > self.rows:
            raise oom()
        return self.step(input_ids, first)


async def test_decode_step_out_of_memory_runs_in_smaller_pieces_with_the_same_tokens(
    worker,
) -> None:
    model = TinyWhisper()
    feats = windows(4, seed=22)
    stats: list[BatchStats] = []
    engine = ContinuousEngine(model, worker, EngineConfig(max_active=4, max_batch_size=4))
    engine.on_batch = stats.append
    engine.start()
    pieces = StepOOM(engine, rows=1)
    results = await asyncio.wait_for(engine.submit_many([task(f) for f in feats]), 60)
    for got, features in zip(results, feats, strict=True):
        assert_same(got.value, reference(model, features, DecodeOptions()))
    assert 4 in pieces.pieces and max(p for p in pieces.pieces[-3:]) == 1
    await asyncio.sleep(0)  # on_batch runs on the loop
    assert any(s.kind == "step" and not s.ok for s in stats)  # counted as failures
    await engine.stop()


async def test_a_sequence_that_cannot_step_even_alone_is_shed(worker) -> None:
    model = TinyWhisper(suppress_eos=True)  # nobody finishes before the limit
    a, b = windows(2, seed=23)
    engine = ContinuousEngine(model, worker, EngineConfig(max_active=4))
    engine.start()
    pieces = StepOOM(engine, rows=0)  # not even one row fits
    done = await asyncio.wait_for(
        asyncio.gather(engine.submit(task(a)), engine.submit(task(b)), return_exceptions=True),
        60,
    )
    assert all(isinstance(d, DeviceOutOfMemoryError) for d in done)
    assert pieces.pieces  # it tried
    assert engine.in_flight == 0 and engine.failed is None  # shed, not fatal
    await engine.stop()


async def test_device_fault_stops_the_engine_and_fails_everything_in_flight(worker) -> None:
    model = TinyWhisper(suppress_eos=True)
    feats = windows(3, seed=24)
    fatal: list[Exception] = []
    engine = ContinuousEngine(model, worker, EngineConfig(max_active=1), on_fatal=fatal.append)
    engine.start()
    calls = {"n": 0}
    step = engine.runtime.decoder.step

    def faulty(input_ids: torch.Tensor, first: int = 0) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError(ILLEGAL_ACCESS)
        return step(input_ids, first)

    engine.runtime.decoder.step = faulty  # type: ignore[method-assign]
    futures = engine.enqueue([task(f) for f in feats])  # one decodes, two wait in the queue
    done = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 60)
    assert all(isinstance(d, DeviceFaultError) for d in done), done
    await asyncio.wait_for(engine.drain(10), 10)
    assert len(fatal) == 1 and isinstance(fatal[0], UnrecoverableError)
    with pytest.raises(UnavailableError, match="unrecoverable"):
        engine.enqueue([task(feats[0])])
    await engine.stop()


async def test_a_crashing_decode_loop_is_fatal_not_resubmitted(worker) -> None:
    model = TinyWhisper()
    fatal: list[Exception] = []
    engine = ContinuousEngine(model, worker, EngineConfig(), on_fatal=fatal.append)
    jobs = {"n": 0}
    work = engine._work

    def counted() -> None:
        jobs["n"] += 1
        work()

    engine._work = counted  # type: ignore[method-assign]

    def broken(*args: Any) -> Any:
        raise KeyError("a bug in the scheduler")

    engine._take = broken  # type: ignore[method-assign]
    engine.start()
    futures = engine.enqueue([task(f) for f in windows(2, seed=25)])
    done = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
    assert all(isinstance(d, UnrecoverableError) for d in done)
    assert "decode loop crashed: KeyError" in str(done[0])
    assert await asyncio.wait_for(engine.drain(10), 10)
    assert jobs["n"] == 1 and len(fatal) == 1
    await engine.stop()


# -- the server: NOT_SERVING, drain, exit non-zero ---------------------------------------------
def test_an_unrecoverable_error_ends_the_server_with_a_non_zero_exit(monkeypatch) -> None:
    """`run()` (the production main) on a model whose device fails: the client gets
    UNAVAILABLE, health goes NOT_SERVING, and run() returns EXIT_UNRECOVERABLE."""
    import server.app as app
    import server.models.loader as loader
    from asr.v1 import asr_pb2, asr_pb2_grpc
    from server.config import Settings
    from server.models.fake import FakeModel
    from tests.conftest import tone, wav_bytes

    model = FakeModel(fail_with=DeviceFaultError("cuda:0 failed in a batch: illegal memory"))
    monkeypatch.setattr(loader, "load_model", lambda settings: model)
    handles: list[app.ServerHandle] = []
    built = threading.Event()
    build = app.build_server

    async def capture(settings: Settings) -> app.ServerHandle:
        handles.append(await build(settings))
        built.set()
        return handles[0]

    monkeypatch.setattr(app, "build_server", capture)
    outcome: dict[str, Any] = {}

    def client() -> None:
        assert built.wait(60)
        channel = grpc.insecure_channel(f"127.0.0.1:{handles[0].port}")
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        statuses = []
        for update in watch:  # SERVING once the model is up
            statuses.append(update.status)
            if update.status == health_pb2.HealthCheckResponse.SERVING:
                break
        audio = asr_pb2.RecognitionAudio(content=wav_bytes(tone(440, 1.0, 16_000), 16_000))
        try:
            asr_pb2_grpc.SpeechStub(channel).Recognize(
                asr_pb2.RecognizeRequest(audio=audio), timeout=30
            )
        except grpc.RpcError as err:
            outcome["code"], outcome["details"] = err.code(), err.details()
        for update in watch:
            statuses.append(update.status)
            if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
        outcome["statuses"] = statuses

    thread = threading.Thread(target=client)
    thread.start()
    settings = Settings(host="127.0.0.1", port=0, metrics_port=-1, warmup=False, grace_s=5)
    code = asyncio.run(app.run(settings))
    thread.join(60)
    assert code == app.EXIT_UNRECOVERABLE != 0
    assert outcome["code"] == grpc.StatusCode.UNAVAILABLE
    assert "illegal memory" in outcome["details"]
    assert outcome["statuses"][-1] == health_pb2.HealthCheckResponse.NOT_SERVING
