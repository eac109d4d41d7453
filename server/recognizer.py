"""Recognition of one complete audio buffer, in plain types: audio -> windows -> batcher -> text.

Decoding, resampling and feature extraction run in worker threads (`asyncio.to_thread`), never
on the event loop; the windows of one request are queued together, so long audio uses the
batch's parallelism, and the results are stitched back in order with their times.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from server.audio import AudioFormat, Window, decode, split_windows
from server.batcher import MicroBatcher
from server.models.base import DecodeOptions, SpeechModel, WindowResult, WindowTask, Word


@dataclass(frozen=True)
class Segment:
    """The text of one window, with times from the start of the audio."""

    text: str
    start_s: float
    end_s: float
    language: str
    confidence: float
    no_speech_prob: float
    words: tuple[Word, ...]


@dataclass(frozen=True)
class Timing:
    queue_s: float
    infer_s: float
    total_s: float
    batch_size: int
    audio_s: float
    windows: int


@dataclass(frozen=True)
class Recognition:
    segments: list[Segment]
    timing: Timing


class Recognizer:
    def __init__(
        self,
        model: SpeechModel,
        batcher: MicroBatcher[WindowTask, WindowResult],
        max_audio_s: float,
    ) -> None:
        self.model = model
        self.batcher = batcher
        self.max_audio_s = max_audio_s

    async def recognize(
        self,
        content: bytes,
        fmt: AudioFormat,
        options: DecodeOptions,
        deadline: float | None = None,
    ) -> Recognition:
        started = time.monotonic()
        self.model.check_options(options)
        samples = await asyncio.to_thread(decode, content, fmt, self.max_audio_s)
        return await self.recognize_samples(samples, options, deadline, started)

    async def recognize_samples(
        self,
        samples: np.ndarray,
        options: DecodeOptions,
        deadline: float | None = None,
        started: float | None = None,
    ) -> Recognition:
        """Recognize 16 kHz mono samples already decoded (streams come in this way)."""
        started = time.monotonic() if started is None else started
        windows = split_windows(samples)
        tasks = await asyncio.to_thread(self._tasks, windows, options)
        results = await self.batcher.submit_many(tasks, deadline)
        segments = [_segment(w, r.value) for w, r in zip(windows, results, strict=True)]
        timing = Timing(
            queue_s=max(r.queue_s for r in results),
            infer_s=sum({r.batch_id: r.infer_s for r in results}.values()),
            total_s=time.monotonic() - started,
            batch_size=max(r.batch_size for r in results),
            audio_s=len(samples) / 16_000,
            windows=len(windows),
        )
        return Recognition([s for s in segments if s.text], timing)

    def _tasks(self, windows: list[Window], options: DecodeOptions) -> list[WindowTask]:
        return [WindowTask(self.model.prepare(w.samples), w.duration_s, options) for w in windows]


def _segment(window: Window, result: WindowResult) -> Segment:
    end_s = window.start_s + window.duration_s
    words = tuple(
        Word(w.word, w.start_s + window.start_s, w.end_s + window.start_s, w.probability)
        for w in result.words
    )
    return Segment(
        result.text.strip(),
        window.start_s,
        end_s,
        result.language,
        result.confidence,
        result.no_speech_prob,
        words,
    )
