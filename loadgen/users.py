"""The Locust user: one simulated client of the Speech service (or one live stream after
another, in a stream level).

A user asks the process's `Control` for the current level, paces itself with that level's
strategy (`loadgen.schedule`: closed loop blocks on each call, open loop sends at Poisson
arrival times in their own greenlets), and leaves timing and reporting to the protocol client
(`loadgen.client`). Locust's `wait_time` is the pacing's wait.

Everything a user needs lives in a `LoadContext`, one per process, bound to the class by
`bind()` (the runner, the worker) or built from Locust's options on first use (the plain
locustfile).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import gevent
from locust import User, task

import loadgen.green  # noqa: F401  (gevent patching before grpc is used)
from loadgen.client import SpeechClient, make_channels
from loadgen.config import Connection, LevelPlan
from loadgen.control import Control
from loadgen.dataset import Dataset, Item, ReplayOrder
from loadgen.schedule import ClosedLoop, OpenLoop, Pacing
from loadgen.stats import Recorder


@dataclass
class LoadContext:
    """What the users of one process share."""

    dataset: Dataset
    fire: Callable[..., Any]
    """Locust's `events.request.fire`."""
    worker: str = "local"
    seed: int = 0
    control: Control = field(default_factory=Control)
    recorder: Recorder = field(default_factory=Recorder)
    client: SpeechClient | None = None
    connection: Connection | None = None
    order: ReplayOrder = field(init=False)
    _generators: dict[int, int] = field(default_factory=dict)
    _streams: int = 0
    _channels: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Processes replay different sequences of the same files, each reproducible.
        self.order = ReplayOrder(len(self.dataset.items), f"{self.seed}:{self.worker}")

    def connect(self, conn: Connection) -> None:
        """(Re)create channels when the connection settings change."""
        if conn != self.connection:
            self.close()
            self._channels = make_channels(conn)
            self.client = SpeechClient(self._channels, self.fire, conn, self.worker)
            self.connection = conn

    def close(self) -> None:
        """Close the channels (before the process forks or exits: gRPC's poller minds)."""
        for channel in self._channels:
            channel.close()
        self._channels = []

    def next_stream_id(self) -> str:
        self._streams += 1
        return f"{self.worker}:{self._streams}"

    def generator_index(self, level: int) -> int:
        """0, 1, ... for the users that start a level here, in the order they start: seeds
        that do not depend on which user objects survived the previous level."""
        index = self._generators.get(level, 0)
        self._generators[level] = index + 1
        return index


class SpeechUser(User):
    """Sends Recognize (or StreamingRecognize) calls with real audio."""

    ctx: ClassVar[LoadContext | None] = None
    context_factory: ClassVar[Callable[[Any], LoadContext] | None] = None
    """Builds the context on first use when nothing was bound (the plain locustfile)."""

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self._level = -1
        self._pacing: Pacing = ClosedLoop()
        self._token: int | None = None
        self._arrival = 0.0  # open loop: perf_counter time of the reserved arrival
        self._epoch_offset = 0.0  # time.time() - perf_counter(), to stamp records

    def wait_time(self) -> float:
        return self._pacing.wait_s(time.perf_counter())

    def on_stop(self) -> None:
        # Killed (fewer users in the next level, or the end): give back a reserved arrival,
        # or the level would wait for it to settle.
        ctx = type(self).ctx
        if self._token is not None and ctx is not None:
            ctx.control.release(self._token)
            self._token = None

    @task
    def step(self) -> None:
        ctx = self._context()
        plan = ctx.control.wait_for_work()
        if plan.index != self._level:
            self._start_level(plan, ctx)
        if plan.mode == "stream":
            self._stream_step(ctx, plan)
        elif self._pacing.blocking:
            self._closed_step(ctx)
        else:
            self._open_step(ctx, plan)

    def _context(self) -> LoadContext:
        cls = type(self)
        if cls.ctx is None:
            if cls.context_factory is None:
                raise RuntimeError("SpeechUser has no LoadContext: bind() one first")
            cls.ctx = cls.context_factory(self.environment)
        return cls.ctx

    def _start_level(self, plan: LevelPlan, ctx: LoadContext) -> None:
        self._level = plan.index
        self._token = None
        self._epoch_offset = time.time() - time.perf_counter()
        if plan.mode == "open":
            seed = f"{plan.seed}:{plan.index}:{ctx.worker}:{ctx.generator_index(plan.index)}"
            self._pacing = OpenLoop(plan.rate_per_user, seed, time.perf_counter())
        else:
            self._pacing = ClosedLoop()

    def _closed_step(self, ctx: LoadContext) -> None:
        assert ctx.client is not None
        token = ctx.control.reserve(time.time())
        if token is None or not ctx.control.start(token):
            return
        item = ctx.dataset.items[ctx.order.next()]
        try:
            ctx.client.call(item, time.perf_counter(), time.time())
        finally:
            ctx.control.release(token)

    def _stream_step(self, ctx: LoadContext, plan: LevelPlan) -> None:
        """One live stream (closed loop: the next opens when this one ends); its token holds
        the level's end until the stream is over."""
        assert ctx.client is not None
        token = ctx.control.reserve(time.time())
        if token is None or not ctx.control.start(token):
            return
        items = [ctx.dataset.items[ctx.order.next()] for _ in range(plan.utterances)]
        try:
            ctx.client.live(items, plan, ctx.next_stream_id())
        finally:
            ctx.control.release(token)

    def _open_step(self, ctx: LoadContext, plan: LevelPlan) -> None:
        if self._token is None:  # first arrival of the level, or the last one was used
            self._reserve_next(ctx)
            if self._token is None:
                return
        delay = self._arrival - time.perf_counter()
        if delay > 0:
            gevent.sleep(delay)  # wait_time got us close; this lands on the exact arrival
        token, arrival = self._token, self._arrival
        self._token = None
        self._pacing.sent()
        if not ctx.control.start(token):
            return  # the level ended while we waited
        late_ms = max(0.0, time.perf_counter() - arrival) * 1000.0
        item = ctx.dataset.items[ctx.order.next()]
        sent_ts = arrival + self._epoch_offset
        if ctx.control.inflight > plan.max_inflight:
            ctx.control.release(token)
            assert ctx.client is not None
            ctx.client.dropped(item, sent_ts, late_ms)
        else:
            gevent.spawn(self._send, ctx, token, item, arrival, sent_ts, late_ms)
        self._reserve_next(ctx)

    def _reserve_next(self, ctx: LoadContext) -> None:
        self._arrival = self._pacing.next_send(time.perf_counter())
        self._token = ctx.control.reserve(self._arrival + self._epoch_offset)

    @staticmethod
    def _send(
        ctx: LoadContext, token: int, item: Item, arrival: float, sent_ts: float, late_ms: float
    ) -> None:
        assert ctx.client is not None
        try:
            ctx.client.call(item, arrival, sent_ts, late_ms)
        finally:
            ctx.control.release(token)


def bind(ctx: LoadContext) -> None:
    """Make ctx the context of every SpeechUser of this process."""
    SpeechUser.ctx = ctx
