"""Iteration-level (continuous) batching of Whisper's decoder, behind the batcher interface.

A plain micro-batcher runs `generate` on a batch: every window waits for the longest one,
finished rows keep costing compute, and a window that arrives just after a batch started waits
for all of it. Here the decoder runs one token at a time over whatever sequences are in flight:

- New windows are encoded in batches (at most `max_batch_size`), their prompts run in one
  pass, and they join the decode batch at the next step; a sequence leaves as soon as it emits
  end-of-text or reaches its token limit, and its caller's future is resolved right then.
- Each sequence holds its own state (the model math is in `server.models.whisper_step`):
  cross-attention K,V computed once from its encoder output, a self-attention KV cache, its
  tokens so far, its prompt (from the generation config, as `generate` builds it) and the
  greedy suppress rules of `generate` (`suppress_tokens`, and `begin_suppress_tokens` at the
  first position).
  One window alone gives exactly the tokens of `generate` (greedy); in a batch, padding can
  change float sums and so, rarely, flip a near-tie.
- Each result carries the no-speech probability (softmax at <|startoftranscript|>) and the
  confidence (geometric mean of the chosen tokens' probabilities after suppression), as
  `WhisperModel` computes them.
- Language detection (a multilingual model, no language given) happens when a window joins:
  one batched decoder pass at <|startoftranscript|> reads the language tokens' logits
  (`server.models.whisper_language`). Word times are computed when a sequence finishes: one
  batched teacher-forced pass gives the alignment heads' cross-attention, then `generate`'s
  median filter and dynamic time warping (`server.models.whisper_align`).
- Windows whose options greedy decoding here doesn't cover (beam_size > 1, temperature > 0, a
  prompt) go through `model.run_batch_yielding` (transformers' `generate`) on the same thread
  (fallback), one batch at a time. It yields after every token (beam step): the decode loop
  then runs its own rounds (joins and steps, no other fallback) for (1 - share) / share of the
  time the fallback just ran (`max_fallback_share`), so a fallback can't hold the others.
- Admission: at most `max_active` sequences decode at once (each holds its caches), at most
  `max_batch_size` windows join at a time, in arrival order, urgent windows before
  background ones (streams' interims); background windows join only while no urgent sequence
  is decoding, so an interim's encoder pass never holds up a final or a unary request
  mid-decode.

Threads: `ContinuousEngine` is used from the asyncio loop (enqueue, futures, lifecycle); the
decode loop runs as one job on the executor given (the single model worker thread, the only
owner of the accelerator) for as long as there is work, and returns when idle, so the event
loop never blocks on the model. The job resolves futures with `loop.call_soon_threadsafe`.
The queue is bounded (QueueFullError); cancelled windows and windows past their deadline are
dropped before they are encoded, and leave the decode batch at the next step if they are
already in it; `drain()` refuses new work (UnavailableError) and waits for the rest.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.batching.base import (
    Batched,
    BatchStats,
    EngineStats,
    as_batch_error,
    expired_in_queue,
    gather_or_cancel,
    out_of_memory_alone,
    queue_full,
    run_in_pieces,
    settle,
    wait_idle,
)
from server.batching.step_times import StepTimes
from server.config import COMPILE_MODES, Settings, check_bounds
from server.errors import (
    BatchError,
    DeadlineExceededError,
    DeviceOutOfMemoryError,
    UnavailableError,
    UnrecoverableError,
)
from server.models.base import SpeechModel, WindowResult, WindowTask
from server.models.whisper_step import DecodeSequence, GreedyRuntime

log = logging.getLogger(__name__)
# Background windows (streams' interims) join in encoder passes of about this long: a final
# or a unary request arriving meanwhile waits for at most one such pass. On a 2-core CPU a
# tiny.en window's pass is ~0.18 s whatever the batch (one window a pass); on a GPU, where a
# window costs milliseconds, interims still join max_batch_size at a time.
BACKGROUND_PASS_S = 0.25


@dataclass
class EngineConfig:
    """Admission limits of the continuous engine: the `Settings` fields of the same names,
    with their bounds (see `server.config`)."""

    max_active: int = 16  # sequences decoding at once; each holds its KV caches (memory)
    max_batch_size: int = 8  # windows encoded together when they join (an encoder pass)
    max_queue_size: int = 256  # windows waiting to join; more raise QueueFullError
    # Each join (an encoder pass) holds every decoding sequence up. New windows wait while a
    # decoding sequence has spent more than this share of its decoding time held up so, so a
    # long transcript still progresses while short requests come and go (the p99). 1: off.
    max_join_share: float = 1.0
    # Between the tokens of a `generate` fallback, the decode loop runs its own rounds so the
    # fallback takes at most this share of the worker's time while others decode. 1: off.
    max_fallback_share: float = 0.25
    # How decode steps run (Settings.compile); off here, so tests don't compile unasked.
    compile: str = "off"

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}")

    @classmethod
    def from_settings(cls, s: Settings) -> EngineConfig:
        return cls(
            s.max_active, s.max_batch_size, s.max_queue_size, s.max_join_share,
            s.max_fallback_share, compile=s.compile,
        )  # fmt: skip


# -- the batcher side: queue, futures, the decode loop on the model worker --------------------
@dataclass(eq=False)
class _Request:
    task: WindowTask
    future: asyncio.Future[Batched[WindowResult]]
    enqueued: float
    deadline: float | None = None  # monotonic seconds
    background: bool = False  # a stream's interim: best effort
    prompt: list[int] | None = None  # its start tokens, set when taken (None: fallback)
    joined: float = 0.0  # when it left the queue
    decoding: float = 0.0  # when its own join pass ended (worker thread)
    held_s: float = 0.0  # time since then spent in other windows' join or fallback passes
    batch_id: int = 0  # the encoder (or fallback) batch it joined with
    closed: bool = False  # its outcome was sent (worker thread only)


class ContinuousEngine:
    """The batcher interface (`server.batching.base.WindowBatcher`: enqueue, submit_many, depth,
    in_flight, start, drain, stop, on_batch) over iteration-level batched decoding.

    `on_batch` gets a `BatchStats` per encoder batch (size: windows that joined; infer_s:
    encoder + prompt pass) and per fallback batch (infer_s: the `run_batch` call), on the event
    loop thread; `stats()` has the decode counters. A `Batched` result has queue_s (to joining),
    infer_s (joining to its end-of-text), batch_size (the most sequences it was decoded with)
    and batch_id (its encoder batch)."""

    engine = "continuous"

    def __init__(
        self,
        model: SpeechModel,
        executor: Executor,
        config: EngineConfig | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_fatal: Callable[[Exception], None] | None = None,
    ) -> None:
        self.model = model
        self.executor = executor
        self.config = config or EngineConfig()
        self.on_batch = on_batch
        # Called once, on the event loop, when the engine can't go on (UnrecoverableError
        # from the model, or the decode loop crashing): the app drains and exits non-zero.
        self.on_fatal = on_fatal
        self.failed: Exception | None = None
        # Rows per decode-step piece after an out-of-memory step (None: all rows at once);
        # back to None when the decode batch empties.
        self._step_rows: int | None = None
        self.runtime = GreedyRuntime(model, self.config.max_active, self.config.compile)
        self.step_times = StepTimes()  # per-step wall times by rows (Prometheus, benchmarks)
        self._lock = threading.Lock()  # guards the queues and _running across the two threads
        self._pending: collections.deque[_Request] = collections.deque()
        self._background: collections.deque[_Request] = collections.deque()
        self._running = False  # a decode loop job is on the executor
        self._job: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = True
        self._stopping = False
        # Windows off the queue and not yet resolved (changed on the worker thread, under
        # the lock): what a crash must still fail.
        self._in_hand: set[_Request] = set()
        self._batches = 0
        # Mean seconds of a join pass per window (encoder and prompt pass), recent passes
        # weighted most: what sizes background joins (_background_cap). Worker thread only.
        self._join_s_per_window: float | None = None
        self._counts: collections.Counter[str] = collections.Counter()
        self._seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._idle = asyncio.Event()
        self._idle.set()

    # -- callers -------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Windows waiting to join the decode batch."""
        return len(self._pending) + len(self._background)

    @property
    def in_flight(self) -> int:
        return self.depth + len(self._in_hand)

    def stats(self) -> EngineStats:
        c = self._counts
        return EngineStats(
            self.depth, len(self.runtime.active), c["steps"], c["step_rows"],
            c["step_rows"] + c["joined"], c["finished"], c["encoder_batches"], c["encoder_windows"],
            c["fallback_windows"], self._seconds["join"], self._seconds["decode"],
            self._seconds["fallback"],
        )  # fmt: skip

    async def submit(
        self, item: WindowTask, deadline: float | None = None
    ) -> Batched[WindowResult]:
        return (await self.submit_many([item], deadline))[0]

    async def submit_many(
        self, items: list[WindowTask], deadline: float | None = None, background: bool = False
    ) -> list[Batched[WindowResult]]:
        """Queue all items or none; wait for all their results. Cancelling the caller cancels
        its windows: queued ones are skipped, decoding ones leave at the next step."""
        return await gather_or_cancel(self.enqueue(items, deadline, background))

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Part of the interface; nothing to do here: a window joins at the next step, so
        there is no batch window to hold open for requests still being prepared."""
        yield

    def enqueue(
        self, items: list[WindowTask], deadline: float | None = None, background: bool = False
    ) -> list[asyncio.Future[Batched[WindowResult]]]:
        """Queue items without waiting; the futures carry the results. `background` items
        (streams' interim re-decodes) join only when no other window is waiting."""
        if self.failed is not None:
            raise UnavailableError(
                f"server is restarting after an unrecoverable error: {self.failed}"
            )
        if not self._accepting:
            raise UnavailableError("server is shutting down and takes no new requests")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        requests = [
            _Request(item, loop.create_future(), now, deadline, background) for item in items
        ]
        with self._lock:
            if self.depth + len(items) > self.config.max_queue_size:
                raise queue_full(self.depth, self.config.max_queue_size, len(items))
            (self._background if background else self._pending).extend(requests)
        self._idle.clear()
        self._kick()
        return [r.future for r in requests]

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._kick()

    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting; wait up to timeout_s for queued and decoding windows. True if
        drained."""
        self._accepting = False
        return await wait_idle(self._idle, timeout_s)

    async def stop(self) -> None:
        """Refuse new work, fail what is queued, end the decode loop at its next step (its
        sequences fail with UnavailableError) and wait for it."""
        self._accepting = False
        self._stopping = True
        with self._lock:
            pending = [*self._pending, *self._background]
            self._pending.clear()
            self._background.clear()
        for r in pending:
            settle(r.future, UnavailableError("server stopped before this request ran"))
        if self._job is not None:
            await asyncio.gather(self._job, return_exceptions=True)
            self._job = None
        self._idle.set()

    @property
    def decode_step(self) -> str:
        """How decode steps run: "compiled (inductor)", "cuda-graphs" or "eager: <why>"."""
        return self.runtime.step_label

    async def warmup(self, batch_sizes: list[int]) -> None:
        """Compile (or capture) the decode step of every row bucket, then decode one second of
        silence in batches of these sizes through the engine (once started), so the first
        requests don't pay for compilation, the slot caches' allocation and the first calls
        of each kernel."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self.runtime.warm_steps)
        silence = await asyncio.to_thread(self.model.prepare, np.zeros(16_000, np.float32))
        for size in sorted(set(batch_sizes)):
            size = min(size, self.config.max_active, self.config.max_queue_size)
            await self.submit_many([WindowTask(silence, 1.0) for _ in range(size)])

    def _kick(self) -> None:
        """Put the decode loop on the executor unless it is there (loop thread)."""
        if self._loop is None or self._stopping:
            return
        with self._lock:
            if self._running or not self.depth:
                return
            self._running = True
        self._job = asyncio.wrap_future(self.executor.submit(self._work), loop=self._loop)
        self._job.add_done_callback(self._job_done)

    def _job_done(self, job: asyncio.Future[None]) -> None:
        if self.failed is not None:  # fatal: never resubmitted (it would crash again)
            self._idle.set()
            if self.on_fatal is not None:
                self.on_fatal(self.failed)
            return
        with self._lock:
            idle = not self.depth and not self._in_hand and not self._running
        if idle:
            self._idle.set()
        else:
            self._kick()

    # -- the decode loop (model worker thread) ------------------------------------------
    def _work(self) -> None:
        try:
            while self._iterate():
                pass
        except UnrecoverableError as err:
            log.error("unrecoverable error, the engine stops: %s", err)
            self._fail_everything(err)
        except BaseException as err:  # a bug: its state is suspect, so it is fatal too
            log.exception("decode loop crashed, the engine stops")
            self._fail_everything(UnrecoverableError(f"decode loop crashed: {type(err).__name__}"))

    def _fail_everything(self, error: UnrecoverableError) -> None:
        """Stop for good: fail what is decoding and queued with `error` (worker thread)."""
        self.failed = error
        self._accepting = False
        self.runtime.clear()
        with self._lock:
            doomed = [*self._in_hand, *self._pending, *self._background]
            self._in_hand.clear()
            self._pending.clear()
            self._background.clear()
            self._running = False
        for r in doomed:
            self._send(r.future, error)

    def _iterate(self) -> bool:
        """One round: drop leavers, let new windows join (or run fallbacks), one decode step.
        False when there is nothing left to do."""
        if self._stopping:
            self._fail_active(UnavailableError("server stopped while this request was decoding"))
            with self._lock:
                self._running = False
            return False
        self._drop_leavers()
        joining, fallback = self._take()
        if fallback:  # the windows taken with it join first: they step between its tokens
            if joining:
                self._join(joining)
                joining = []
            self._run_fallback(fallback)
        self._decode_round(joining)
        with self._lock:
            if not self.depth and not self.runtime.active:
                self._running = False
                return False
        return True

    def _decode_round(self, joining: list[_Request]) -> bool:
        """Join `joining`, then one decode step; whether there was anything to do."""
        if joining:
            self._join(joining)
        stepped = bool(self.runtime.active)
        if stepped:
            self._step()
        if not self.runtime.active:
            self._step_rows = None  # memory pressure ended with the batch
        return stepped or bool(joining)

    def _between_fallback_tokens(self) -> bool:
        """One round of the shared decode inside a fallback's `generate` (worker thread):
        leavers out, supported windows in (fallbacks stay queued: one runs at a time), one
        step. Whether there was anything to do."""
        if self._stopping:
            return False  # the outer loop fails what is decoding once the fallback returns
        self._drop_leavers()
        joining, _ = self._take(fallbacks=False)
        return self._decode_round(joining)

    def _take(self, fallbacks: bool = True) -> tuple[list[_Request], list[_Request]]:
        """Take windows off the queue in order: supported ones up to the free slots and the
        encoder batch cap, others into a fallback batch (unless `fallbacks` is False: they
        stay queued, in order); drop cancelled and expired ones."""
        free = self.config.max_active - len(self.runtime.active)
        cap = min(free, self.config.max_batch_size)
        joining: list[_Request] = []
        fallback: list[_Request] = []
        now = time.monotonic()
        expired: list[_Request] = []
        # Background windows wait while urgent ones decode: each join is an encoder pass that
        # holds every decoding sequence up, and a final or a unary request shouldn't pay that
        # for an interim (on a CPU, a pass costs as much as a dozen steps). For the same
        # reason they never share an urgent window's pass, and join in passes of about
        # BACKGROUND_PASS_S, so a final that arrives meanwhile waits that long at most.
        background = self._background
        if background and any(not seq.owner.background for seq in self.runtime.active):
            background = collections.deque()
        background_cap = self._background_cap(cap)
        kept: dict[int, tuple[collections.deque[_Request], list[_Request]]] = {}
        with self._lock:
            if not self._join_now(free, now):
                return joining, fallback
            while queue := self._pending or background:  # urgent windows first
                r = queue.popleft()
                if r.deadline is not None and now >= r.deadline:
                    expired.append(r)
                elif not r.future.done():  # not cancelled (a read of its state only)
                    r.prompt = self.runtime.prompt(r.task.options)
                    if r.prompt is None and not fallbacks:
                        kept.setdefault(id(queue), (queue, []))[1].append(r)
                        continue
                    group, limit = (joining, cap) if r.prompt is not None else (fallback, cap or 1)
                    if r.background and group is joining:
                        limit = 0 if any(not j.background for j in joining) else background_cap
                    if len(group) >= limit:
                        queue.appendleft(r)
                        break
                    group.append(r)
            for queue, skipped in kept.values():
                queue.extendleft(reversed(skipped))
            self._in_hand.update(joining + fallback)
        for r in expired:
            self._send(r.future, expired_in_queue(now - r.enqueued))
        for r in joining + fallback:
            r.joined = now
        return joining, fallback

    def _background_cap(self, cap: int) -> int:
        """Background windows per encoder pass: as many as take about BACKGROUND_PASS_S at
        the encoder time per window measured so far (one until measured), at most `cap`."""
        per_window = self._join_s_per_window
        if per_window is None:
            return min(cap, 1)
        return min(cap, max(1, int(BACKGROUND_PASS_S / max(per_window, 1e-6))))

    def _join_now(self, free: int, now: float) -> bool:
        """Whether waiting windows join at this step (lock held)."""
        if not self.runtime.active or not self._accepting:
            return True
        if free <= 0 or not self.depth:
            return False
        # The tail guard: let the sequences decoding now catch up first.
        share = self.config.max_join_share
        return share >= 1 or not any(
            seq.owner.held_s > share * (now - seq.owner.decoding) for seq in self.runtime.active
        )

    def _drop_leavers(self) -> None:
        """Cancelled sequences and those past their deadline leave the batch now."""
        now = time.monotonic()
        gone: list[tuple[DecodeSequence, DeadlineExceededError | None]] = []
        for seq in self.runtime.active:
            r: _Request = seq.owner
            if r.future.done():  # cancelled by its caller (a read of its state only)
                gone.append((seq, None))
            elif r.deadline is not None and now >= r.deadline:
                gone.append((seq, DeadlineExceededError("deadline passed while decoding")))
        if gone:
            self.runtime.leave([seq for seq, _ in gone])
            for seq, error in gone:
                self._close(seq.owner, error)

    def _hold(self, held: list[DecodeSequence], started: float) -> None:
        """Charge a join or fallback pass to the sequences it held up."""
        now = time.monotonic()
        for seq in held:
            seq.owner.held_s += now - started

    def _join(self, joining: list[_Request]) -> None:
        started = time.monotonic()
        held = list(self.runtime.active)
        failures = self._join_in_pieces(joining)
        took = time.monotonic() - started
        self._seconds["join"] += took
        per_window = took / len(joining)
        old = self._join_s_per_window
        self._join_s_per_window = per_window if old is None else 0.8 * old + 0.2 * per_window
        self._hold(held, started)
        now = time.monotonic()
        for r in joining:
            r.decoding = now
        self._report(joining, now - started, failures)

    def _join_in_pieces(self, joining: list[_Request]) -> int:
        """Encode `joining` and start decoding it; returns the encoder passes that raised.
        Out of memory: retried in halves, and a window that doesn't fit alone fails with
        DeviceOutOfMemoryError; another error: each window is retried alone, so only the
        windows that fail alone fail."""
        self._batches += 1
        for r in joining:
            r.batch_id = self._batches
        self._counts["encoder_batches"] += 1
        self._counts["encoder_windows"] += len(joining)
        try:
            seqs = self.runtime.join(
                [r.task.features for r in joining],
                [r.prompt or [] for r in joining],
                joining,
                [self.runtime.draft(r.task.options) for r in joining],
                [r.task.duration_s if r.task.options.word_timestamps else None for r in joining],
            )
        except UnrecoverableError:
            raise
        except Exception as err:
            self.runtime.leave([s for s in self.runtime.active if s.owner in joining])
            return 1 + self._retry_join(joining, err)
        self._counts["joined"] += len(seqs)
        self._finish([s for s in seqs if s.finished])
        return 0

    def _retry_join(self, joining: list[_Request], err: Exception) -> int:
        if len(joining) == 1:
            if isinstance(err, DeviceOutOfMemoryError):
                self._close(joining[0], out_of_memory_alone(err))
            else:
                log.error("encoder pass failed on one window", exc_info=err)
                self._close(joining[0], as_batch_error(err))
            return 0
        if isinstance(err, DeviceOutOfMemoryError):
            log.warning("out of memory encoding %d windows: retrying in halves", len(joining))
            half = (len(joining) + 1) // 2
            parts = [joining[:half], joining[half:]]
        else:
            log.warning("encoder batch of %d failed (%s): each alone", len(joining), err)
            parts = [[r] for r in joining]
        return sum(self._join_in_pieces(part) for part in parts)

    def _step(self) -> None:
        rows = len(self.runtime.active)
        started = time.monotonic()
        try:
            self._step_in_pieces()
        except UnrecoverableError:
            raise
        except Exception as err:
            log.exception("decode step of %d sequences failed", rows)
            self._fail_active(BatchError(f"decode step failed: {type(err).__name__}"))
            self._report_step_failure(rows, time.monotonic() - started)
            return
        finally:
            self._seconds["decode"] += time.monotonic() - started
        self.step_times.observe(rows, time.monotonic() - started)
        self._counts["steps"] += 1
        self._counts["step_rows"] += rows
        self._finish([s for s in self.runtime.active if s.finished])

    def _step_in_pieces(self) -> None:
        """One step; out of memory: again in pieces of half the rows (kept for the steps
        after), and a sequence that can't step even alone leaves with DeviceOutOfMemoryError
        (the one that joined last, so the longest-running ones finish)."""
        while self.runtime.active:
            try:
                self.runtime.step(self._step_rows)
                return
            except DeviceOutOfMemoryError as err:
                rows = min(self._step_rows or len(self.runtime.active), len(self.runtime.active))
                self._report_step_failure(rows, 0.0)
                if rows > 1:
                    self._step_rows = (rows + 1) // 2
                    log.warning("out of memory in a decode step of %d rows: pieces of %d",
                                rows, self._step_rows)  # fmt: skip
                    continue
                newest = self.runtime.active[-1]
                self.runtime.leave([newest])
                self._close(newest.owner, out_of_memory_alone(err))

    def _report_step_failure(self, rows: int, infer_s: float) -> None:
        if self.on_batch is not None:
            self._call_soon(self.on_batch, BatchStats(rows, [], infer_s, False, 1, "step"))

    def _finish(self, done: list[DecodeSequence]) -> None:
        """Free the slots of finished sequences and resolve their callers now."""
        if not done:
            return
        self.runtime.leave(done)
        self._counts["finished"] += len(done)
        try:
            results: list[WindowResult | Exception] = list(self.runtime.results(done))
        except UnrecoverableError:
            raise
        except Exception as err:  # the word-time pass: only the windows that wanted them
            log.exception("word-time pass of %d sequences failed", len(done))
            results = [self._result_without_words(seq, err) for seq in done]
        now = time.monotonic()
        for seq, value in zip(done, results, strict=True):
            r: _Request = seq.owner
            if isinstance(value, Exception):
                self._close(r, value)
                continue
            # decoding is unset when it finished inside its own join pass (still running).
            result = Batched(
                value, r.joined - r.enqueued, now - r.joined,
                seq.most_rows, r.batch_id, (r.decoding or now) - r.joined, r.held_s,
            )  # fmt: skip
            self._close(r, result)

    def _result_without_words(
        self, seq: DecodeSequence, err: Exception
    ) -> WindowResult | Exception:
        if seq.duration_s is not None:
            return as_batch_error(err)
        return self.runtime.result(seq)

    def _run_fallback(self, batch: list[_Request]) -> None:
        started = time.monotonic()
        self._batches += 1
        turns = _FallbackTurns(self, self.config.max_fallback_share)
        pieces = run_in_pieces(
            lambda tasks: self.model.run_batch_yielding(tasks, turns.pause),
            [r.task for r in batch],
        )
        turns.pause(share=False)  # charge its last stretch to the sequences it held
        infer_s = time.monotonic() - started
        # Counted before the callers hear back, so whoever reads stats() after a reply sees it.
        self._counts["fallback_windows"] += len(batch)
        self._seconds["fallback"] += infer_s
        for r, out in zip(batch, pieces.outcomes, strict=True):
            queue_s = r.joined - r.enqueued
            result = out if isinstance(out, Exception) else Batched(
                out, queue_s, infer_s, len(batch), self._batches
            )  # fmt: skip
            self._close(r, result)
        self._report(batch, infer_s, pieces.failures)

    def _fail_active(self, error: Exception) -> None:
        active = self.runtime.active
        self.runtime.clear()
        for seq in active:
            self._close(seq.owner, error)

    def _close(self, r: _Request, outcome: Batched[WindowResult] | Exception | None) -> None:
        """A taken window is done: send its outcome (None: its caller is gone) once."""
        if r.closed:
            return
        r.closed = True
        with self._lock:
            self._in_hand.discard(r)
        if outcome is not None:
            self._send(r.future, outcome)

    # -- to the event loop ---------------------------------------------------------------
    def _send(
        self,
        future: asyncio.Future[Batched[WindowResult]],
        outcome: Batched[WindowResult] | Exception,
    ) -> None:
        self._call_soon(settle, future, outcome)

    def _report(self, batch: list[_Request], infer_s: float, failures: int) -> None:
        if self.on_batch is not None:
            queue_s = [r.joined - r.enqueued for r in batch]
            stats = BatchStats(len(batch), queue_s, infer_s, not failures, failures)
            self._call_soon(self.on_batch, stats)

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self._loop.call_soon_threadsafe(fn, *args)


class _FallbackTurns:
    """A `generate` fallback's bounded share of the worker (issue: one client's beam search
    stalled everyone). `pause()` runs between the fallback's tokens: the time the fallback ran
    since the last pause is charged to the sequences it held, and buys the shared decode
    (1 - share) / share as much time, spent in rounds while it has work (debt carries over,
    idle credit does not), so a neighbour decodes at least at (1 - share) of its idle speed
    and the fallback still gets `share` when everyone is busy."""

    def __init__(self, engine: ContinuousEngine, share: float) -> None:
        self.engine = engine
        self.ratio = (1 - share) / share
        self.credit_s = 0.0
        self.resumed = time.monotonic()

    def pause(self, share: bool = True) -> None:
        engine = self.engine
        engine._hold(list(engine.runtime.active), self.resumed)
        if share and self.ratio > 0:
            self.credit_s += (time.monotonic() - self.resumed) * self.ratio
            while self.credit_s > 0:
                started = time.monotonic()
                if not engine._between_fallback_tokens():
                    self.credit_s = min(self.credit_s, 0.0)
                    break
                self.credit_s -= time.monotonic() - started
        self.resumed = time.monotonic()
