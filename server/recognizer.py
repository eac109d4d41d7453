"""Recognition of one complete audio buffer, in plain types: audio -> windows -> batcher -> text.

Decoding, resampling and feature extraction run in worker threads (`asyncio.to_thread`), never
on the event loop; the windows of one request are queued together, so long audio uses the
batch's parallelism, and the results are stitched back in order with their times.

No speech, no text: Whisper answers "you" to silence and noise. Two gates stop that, for
unary requests and streams alike: a window whose loudest 20 ms frame is below `silence_dbfs`
is not decoded at all (no model time), and a decoded window whose no-speech probability (the
<|nospeech|> token at the start of the transcript) is above `no_speech_threshold` gives no text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.audio import SAMPLE_RATE, AudioFormat, Window, decode, split_windows
from server.batching.base import Batched, WindowBatcher
from server.errors import InvalidArgumentError
from server.models.base import DecodeOptions, SpeechModel, WindowResult, WindowTask, Word


@dataclass(frozen=True)
class SpeechGate:
    """When to call a window speech. Both gates off: no_speech_threshold=1, silence_dbfs=-200."""

    no_speech_threshold: float = 0.6
    silence_dbfs: float = -60.0

    def is_silent(self, samples: np.ndarray) -> bool:
        return loudest_frame_dbfs(samples) < self.silence_dbfs


def loudest_frame_dbfs(samples: np.ndarray, frame: int = 320) -> float:
    """Level of the loudest 20 ms frame, in dB relative to full scale. A constant offset (DC)
    is not sound: each frame's mean is taken out first, so a file of constant samples is
    silence, not 600 s of loud audio for the decoder to hallucinate over."""
    n = len(samples) // frame
    if n == 0:
        rms = float(np.std(samples)) if len(samples) else 0.0
    else:
        frames = samples[: n * frame].reshape(n, frame)
        rms = float(frames.std(axis=1).max())
    return 20 * float(np.log10(rms + 1e-10))


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
    tokens: tuple[int, ...] = ()  # the model's token ids of `text` (drafts for re-decodes)


@dataclass(frozen=True)
class Timing:
    queue_s: float
    infer_s: float
    total_s: float
    batch_size: int
    audio_s: float
    windows: int
    # The split of total_s along the window that finished last (the critical path):
    # prepare (decode, resample, features) + wait (queued) + encode + decode + held.
    prepare_s: float = 0.0
    wait_s: float = 0.0
    encode_s: float | None = None  # None: the engine does not time the encoder apart
    decode_s: float = 0.0
    held_s: float = 0.0


@dataclass(frozen=True)
class Recognition:
    segments: list[Segment]  # only segments with text, in order
    timing: Timing

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments)


class Recognizer:
    def __init__(
        self,
        model: SpeechModel,
        batcher: WindowBatcher,
        max_audio_s: float,
        gate: SpeechGate | None = None,
        max_windows: int | None = None,
    ) -> None:
        self.model = model
        self.batcher = batcher
        self.max_audio_s = max_audio_s
        self.gate = gate or SpeechGate()
        # The most windows one request may queue (the queue's size): more can never fit.
        self.max_windows = max_windows

    async def recognize(
        self,
        content: bytes,
        fmt: AudioFormat,
        options: DecodeOptions,
        deadline: float | None = None,
    ) -> Recognition:
        started = time.monotonic()
        with self.batcher.preparing():
            samples, windows = await asyncio.to_thread(self._decode, content, fmt, options)
            tasks = await asyncio.to_thread(self._tasks, windows, options)
        return await self._run(samples, windows, tasks, options, deadline, started)

    def _decode(
        self, content: bytes, fmt: AudioFormat, options: DecodeOptions
    ) -> tuple[np.ndarray, list[Window]]:
        """Options first (cheap to refuse), then the audio; in a thread, off the loop."""
        self.model.check_options(options)
        samples = decode(content, fmt, self.max_audio_s)
        return samples, split_windows(samples)

    async def recognize_samples(
        self,
        samples: np.ndarray,
        options: DecodeOptions,
        deadline: float | None = None,
        started: float | None = None,
        offset_s: float = 0.0,
        background: bool = False,
    ) -> Recognition:
        """Recognize 16 kHz mono samples already decoded (streams come in this way); times
        in the result are shifted by `offset_s`. `background` work (interim re-decodes) is
        batched after everything else."""
        started = time.monotonic() if started is None else started
        windows = await asyncio.to_thread(split_windows, samples)
        tasks = await asyncio.to_thread(self._tasks, windows, options)
        return await self._run(
            samples, windows, tasks, options, deadline, started, offset_s, background
        )

    async def _run(
        self,
        samples: np.ndarray,
        windows: list[Window],
        tasks: list[tuple[Window, WindowTask]],
        options: DecodeOptions,
        deadline: float | None,
        started: float,
        offset_s: float = 0.0,
        background: bool = False,
    ) -> Recognition:
        results: list[Batched[WindowResult]] = []
        queued = time.monotonic()
        if tasks:
            results = await self.batcher.submit_many([t for _, t in tasks], deadline, background)
        segments = [
            _segment(w, r.value, offset_s)
            for (w, _), r in zip(tasks, results, strict=True)
            if r.value.no_speech_prob <= self.gate.no_speech_threshold
        ]
        timing = Timing(
            queue_s=max((r.queue_s for r in results), default=0.0),
            infer_s=sum({r.batch_id: r.infer_s for r in results}.values()),
            total_s=time.monotonic() - started,
            batch_size=max((r.batch_size for r in results), default=0),
            audio_s=len(samples) / SAMPLE_RATE,
            windows=len(windows),
            **_critical_path(results, queued - started),
        )
        return Recognition([s for s in segments if s.text], timing)

    @property
    def room(self) -> int:
        """Windows that may still be queued before a full batch waits: best-effort work
        (streams' interims) starts only while there is room."""
        return max(0, self.batcher.config.max_batch_size - self.batcher.depth)

    def _voiced(self, windows: list[Window]) -> list[Window]:
        return [w for w in windows if not self.gate.is_silent(w.samples)]

    def _tasks(
        self, windows: list[Window], options: DecodeOptions
    ) -> list[tuple[Window, WindowTask]]:
        """The voiced windows' model inputs (an RMS pass and features: in a thread)."""
        windows = self._voiced(windows)
        if self.max_windows is not None and len(windows) > self.max_windows:
            raise InvalidArgumentError(
                f"this audio needs {len(windows)} windows of up to 30 s and this server queues "
                f"at most {self.max_windows} per request: send shorter audio (it will never "
                "fit, whatever the load)"
            )
        # A draft is of the window the audio starts with, no other.
        rest = dataclasses.replace(options, draft=()) if options.draft else options
        return [
            (
                w,
                WindowTask(
                    self.model.prepare(w.samples), w.duration_s, rest if w.start_s else options
                ),
            )
            for w in windows
        ]


def _critical_path(results: list[Batched[WindowResult]], prepare_s: float) -> dict[str, Any]:
    """Timing's split fields from the window that finished last (windows of a request are
    queued together, so it is the one with the longest queue + inference)."""
    if not results:
        return {"prepare_s": prepare_s}
    last = max(results, key=lambda r: r.queue_s + r.infer_s)
    return {
        "prepare_s": prepare_s,
        "wait_s": last.queue_s,
        "encode_s": last.encode_s,
        "decode_s": last.decode_s,
        "held_s": last.held_s,
    }


def _segment(window: Window, result: WindowResult, offset_s: float) -> Segment:
    start_s = offset_s + window.start_s
    words = tuple(
        Word(w.word, w.start_s + start_s, w.end_s + start_s, w.probability) for w in result.words
    )
    return Segment(
        result.text.strip(),
        start_s,
        start_s + window.duration_s,
        result.language,
        result.confidence,
        result.no_speech_prob,
        words,
        result.tokens,
    )
