"""Wall time of each decode step, by the number of rows it ran: what a token costs.

The decode loop (model worker thread) records each step here; a Prometheus scrape (another
thread) reads a snapshot, so the loop never touches a Prometheus object. Steps are grouped by
row bucket (1, 2, 4, 8, ...: the shapes a static-shape step runs at), so "a token at one active
sequence" and "a step of eight" are read apart. Tokens per second is over the steps of the last
`window_s` seconds of decoding.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from dataclasses import dataclass

# Per-step buckets, 0.25 ms to 1 s: a compiled CPU step of tiny.en is a few ms, a GPU step
# well under one, a large model's step of 64 rows on a CPU hundreds.
STEP_BUCKETS_S = (
    0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015,
    0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 1.0,
)  # fmt: skip


def rows_bucket(rows: int) -> int:
    """The power of two at or above `rows`: the label a step is counted under."""
    return 1 << max(0, rows - 1).bit_length()


@dataclass
class StepHistogram:
    counts: list[int]  # per bucket of STEP_BUCKETS_S, then +Inf (not cumulative)
    sum_s: float = 0.0
    steps: int = 0
    rows: int = 0  # sum of rows over those steps (tokens, finished rows included)


class StepTimes:
    """Per-step decode times by row bucket, and recent tokens per second (thread-safe)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._by_rows: dict[int, StepHistogram] = {}
        self._recent: collections.deque[tuple[float, int, float]] = collections.deque()

    def observe(self, rows: int, seconds: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            label = rows_bucket(rows)
            h = self._by_rows.get(label)
            if h is None:
                h = self._by_rows[label] = StepHistogram([0] * (len(STEP_BUCKETS_S) + 1))
            h.counts[bisect.bisect_left(STEP_BUCKETS_S, seconds)] += 1
            h.sum_s += seconds
            h.steps += 1
            h.rows += rows
            self._recent.append((now, rows, seconds))
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()

    def snapshot(self) -> dict[int, StepHistogram]:
        with self._lock:
            return {k: StepHistogram(list(h.counts), h.sum_s, h.steps, h.rows)
                    for k, h in sorted(self._by_rows.items())}  # fmt: skip

    def tokens_per_second(self, now: float | None = None) -> float:
        """Tokens over step time of the steps in the last window (0 when none)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            recent = [(r, s) for t, r, s in self._recent if t >= now - self.window_s]
        busy = sum(s for _, s in recent)
        return sum(r for r, _ in recent) / busy if busy > 0 else 0.0
