"""A small fake model behind the real batch interface, for fast tests of batcher and servicer.

Its "features" are the audio samples themselves; its "transcript" says how many samples and
what mean value it saw, so a test can tell which request a result belongs to. Tests can gate
`run_batch` with events, make it fail on purpose, or give each window a cost (`delay_s`).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from server.errors import InvalidArgumentError
from server.models.base import DecodeOptions, ModelInfo, SpeechModel, WindowResult, WindowTask


class FakeModel(SpeechModel):
    def __init__(self, fail_with: Exception | None = None) -> None:
        self.info = ModelInfo("fake", False, "cpu", "fake cpu", "float32", ("en",))
        self.batches: list[int] = []
        self.fail_with = fail_with
        self.gate: threading.Event | None = None  # when set by a test, run_batch waits on it
        self.started = threading.Event()  # set when a batch starts running
        self.worker_threads: set[str] = set()
        self.delay_s = 0.0  # model time per window of a batch (a test sets the cost)
        self.check_threads: set[str] = set()  # where check_options ran (never the event loop)

    def prepare(self, samples: np.ndarray) -> np.ndarray:
        return samples

    def check_options(self, options: DecodeOptions) -> None:
        self.check_threads.add(threading.current_thread().name)
        if options.language not in (None, "en"):
            raise InvalidArgumentError(f"fake model is English-only, not {options.language!r}")

    def run_batch(self, tasks: list[WindowTask]) -> list[WindowResult]:
        self.worker_threads.add(threading.current_thread().name)
        self.batches.append(len(tasks))
        self.started.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.fail_with is not None:
            raise self.fail_with
        if self.delay_s:
            time.sleep(self.delay_s * len(tasks))  # stands in for compute: not a wait for state
        return [WindowResult(describe(t.features), "en", confidence=0.9) for t in tasks]


def describe(samples: np.ndarray) -> str:
    """The fake transcript of `samples`: enough to tell requests apart."""
    mean = float(np.mean(samples)) if len(samples) else 0.0
    return f"n={len(samples)} mean={mean:.3f}"
