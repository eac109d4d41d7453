"""The batch interface between the batcher and a speech model, in plain Python types.

A model is a pure batch function: `run_batch(list[WindowTask]) -> list[WindowResult]` of the
same length and order. `prepare()` turns audio into model input and is thread-safe (it runs in
request threads); `run_batch()` and `warmup()` are only ever called from the single model worker
thread, which owns the accelerator. No protobuf here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# Text fields are bounded in bytes before any tokenizer sees them (a 60 MB prompt tokenized
# would hold a core for seconds): 223 prompt tokens of any script fit in MAX_PROMPT_BYTES.
MAX_PROMPT_BYTES = 4096


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode one window. Windows with equal options can share one generate call."""

    language: str | None = None  # None: English for .en models, detected for multilingual ones
    task: str = "transcribe"  # or "translate"
    temperature: float = 0.0
    beam_size: int = 1
    prompt: str = ""
    word_timestamps: bool = False
    # A guess of this window's tokens (`WindowResult.tokens` of an earlier decode by the same
    # model: a stream's last interim). The continuous engine verifies it in one pass and
    # decodes only the rest; the transcript is the same as without it, so other paths may
    # ignore it.
    draft: tuple[int, ...] = ()


@dataclass
class WindowTask:
    """One <= 30 s window of one request: the unit the batcher batches."""

    features: np.ndarray  # the model's input for this window, from SpeechModel.prepare()
    duration_s: float
    options: DecodeOptions = field(default_factory=DecodeOptions)


@dataclass(frozen=True)
class Word:
    """A word with times relative to the start of its window."""

    word: str
    start_s: float
    end_s: float
    probability: float = 0.0


@dataclass(frozen=True)
class WindowResult:
    """What the model heard in one window."""

    text: str
    language: str
    confidence: float = 0.0  # geometric mean of token probabilities, 0 when unknown
    no_speech_prob: float = 0.0
    words: tuple[Word, ...] = ()
    tokens: tuple[int, ...] = ()  # the text's token ids, for drafts (empty when unknown)


@dataclass(frozen=True)
class ModelInfo:
    """What `GetServerInfo` reports about the model."""

    model_id: str
    multilingual: bool
    device: str
    device_name: str
    dtype: str
    languages: tuple[str, ...] = ()
    dtype_reason: str = ""  # why this dtype ("auto: this CPU has native bf16 (avx512_bf16)")


class SpeechModel(ABC):
    """A loaded speech model behind the batch interface."""

    info: ModelInfo
    # Whether `server.batching.continuous` can decode this model step by step (a transformers
    # Whisper); others are served by batched `run_batch` calls only.
    supports_continuous: bool = False

    @abstractmethod
    def prepare(self, samples: np.ndarray) -> np.ndarray:
        """16 kHz mono float32 audio (<= 30 s) -> model input for one window. Thread-safe."""

    @abstractmethod
    def run_batch(self, tasks: list[WindowTask]) -> list[WindowResult]:
        """Decode a batch of windows; returns one result per task, in order."""

    def run_batch_yielding(
        self, tasks: list[WindowTask], pause: Callable[[], None]
    ) -> list[WindowResult]:
        """`run_batch`, calling `pause()` now and then (between decoding steps) so the caller
        can run other work on this thread; a model that can't pause just runs the batch."""
        return self.run_batch(tasks)

    def warmup(self, batch_sizes: list[int]) -> None:  # noqa: B027 - optional hook
        """Run the model once per batch size so the first requests don't pay for lazy init."""

    def check_options(self, options: DecodeOptions) -> None:  # noqa: B027 - optional hook
        """Raise InvalidArgumentError if this model can't decode with `options`."""
