"""Live streams as a user feels them: real-time pacing of the audio, and what each response
of a stream says about latency. Pure arithmetic on times the caller records; no gRPC, no
gevent, so it is tested with a fake clock.

A stream carries one or more utterances (dataset files) with `gap_s` of silence between them,
cut into `chunk_s` chunks. `PacedChunks` hands chunk k to gRPC at `t0 + k * chunk_s / pace`
(`pace` inf: as fast as gRPC takes them) and records when each was actually taken; a chunk
taken later than due means the stream's send backlog grew (gRPC flow control pushed back, or
the generator itself could not keep up): the stream fell *behind real time*.

Latency of a response, Riva's method: its arrival time minus the send time of the newest
chunk it can reflect, the chunk holding the end of the audio the result covers
(`result_end_time`, in stream seconds). So an interim that reflects audio up to 3.2 s is timed
from the chunk with 3.2 s in it, however long ago the stream began; a final from the chunk
that ended its utterance (the endpoint's silence, or the half-close).

Each result is attributed to the utterance whose span (its start to the next one's start)
holds the end of the audio it reflects; an utterance's figures:

* first interim: arrival of its first interim minus the send time of its first chunk;
* interim latencies: every interim, Riva's method;
* final lag: its last final, Riva's method (earlier finals, when the server's endpointer cut
  the utterance in two, are interim-like and counted as interims);
* the finals' text (for WER) and flicker: the words an interim showed that the next interim of
  the same utterance no longer starts with (retracted words), summed.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

PACE_MAX = math.inf
"""`--pace max`: no pacing, chunks as fast as the stream takes them (the old replay)."""


def parse_pace(text: str) -> float:
    """'1.0' -> 1.0, 'max' -> inf; raises ValueError otherwise."""
    if text.strip().lower() == "max":
        return PACE_MAX
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"pace must be > 0 or 'max', not {text!r}")
    return value


@dataclass(frozen=True)
class Span:
    """Where one utterance lies in its stream, in stream seconds."""

    item_id: str
    start_s: float
    end_s: float
    reference: str | None = None

    @property
    def audio_s(self) -> float:
        return self.end_s - self.start_s


def layout(
    pcms: Sequence[tuple[bytes, int]], ids: Sequence[str], gap_s: float
) -> tuple[bytes, int, list[Span]]:
    """One stream's audio: the utterances (mono 16-bit PCM, each at its rate) at the first
    one's rate, `gap_s` of silence between them; returns the PCM, the rate and the spans."""
    rate = pcms[0][1]
    parts: list[bytes] = []
    spans: list[Span] = []
    offset = 0
    silence = bytes(2 * round(gap_s * rate))
    for i, ((pcm, pcm_rate), item_id) in enumerate(zip(pcms, ids, strict=True)):
        if i:
            parts.append(silence)
            offset += len(silence) // 2
        if pcm_rate != rate:  # a load test's resampling: linear is enough
            x = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
            n = round(len(x) * rate / pcm_rate)
            resampled = np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x)
            pcm = resampled.astype("<i2").tobytes()
        samples = len(pcm) // 2
        spans.append(Span(item_id, offset / rate, (offset + samples) / rate))
        parts.append(pcm)
        offset += samples
    return b"".join(parts), rate, spans


def chunk(pcm: bytes, rate: int, chunk_s: float) -> list[bytes]:
    """`chunk_s` pieces of 16-bit PCM (the last may be shorter), whole samples each."""
    step = max(2, 2 * round(rate * chunk_s))
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


@dataclass
class PacedChunks:
    """The audio chunks of one stream, handed out on a real-time schedule.

    `clock` and `sleep` are injectable (a test's fake clock); in the load generator they are
    `time.perf_counter` and (gevent-patched) `time.sleep`."""

    chunks: Sequence[bytes]
    chunk_s: float
    pace: float = 1.0
    clock: Callable[[], float] = time.perf_counter
    sleep: Callable[[float], None] = time.sleep
    t0: float = math.nan
    """Clock time the first chunk was due (set when the first chunk is asked for)."""
    sent: list[float] = field(default_factory=list)
    """Clock time each chunk was taken (handed to gRPC), in order."""

    def due(self, k: int) -> float:
        return self.t0 + (0.0 if math.isinf(self.pace) else k * self.chunk_s / self.pace)

    def __iter__(self) -> Iterator[bytes]:
        self.t0 = self.clock()
        for k, piece in enumerate(self.chunks):
            delay = self.due(k) - self.clock()
            if delay > 0:
                self.sleep(delay)
            self.sent.append(self.clock())
            yield piece

    def lateness_s(self) -> list[float]:
        """How long after it was due each chunk was taken (>= 0)."""
        return [max(0.0, t - self.due(k)) for k, t in enumerate(self.sent)]

    def chunk_at(self, stream_s: float) -> int:
        """Index of the chunk that holds stream time `stream_s` (its end: a result that
        reflects audio up to 3.2 s needs the chunk that ends at or after 3.2 s)."""
        k = math.ceil(stream_s / self.chunk_s - 1e-9) - 1
        return min(max(k, 0), len(self.chunks) - 1)


@dataclass(frozen=True)
class Arrival:
    """One result of a stream's responses, as the client saw it."""

    at: float
    """Clock time of the response's arrival (same clock as PacedChunks)."""
    is_final: bool
    text: str
    end_s: float
    """result_end_time: the end of the audio the result reflects, in stream seconds."""
    timing: object | None = None
    """The response's ServerTiming, if any (kept as is for the protocol client)."""


@dataclass
class UtteranceFigures:
    """What one utterance of a stream measured (times in clock seconds, latencies in ms)."""

    span: Span
    first_sent: float | None
    """Clock time its first chunk was taken; None if the stream failed before."""
    first_interim_ms: float | None = None
    interim_ms: list[float] = field(default_factory=list)
    final_lag_ms: float | None = None
    final_at: float | None = None
    finals: list[str] = field(default_factory=list)
    interims: list[str] = field(default_factory=list)
    timing: object | None = None
    """ServerTiming of its last final."""
    backlog_ms: float = 0.0
    """The largest lateness of its chunks."""

    @property
    def transcript(self) -> str:
        return " ".join(t for t in self.finals if t).strip()

    @property
    def flicker_words(self) -> int:
        return flicker(self.interims)


def retracted(before: str, after: str) -> int:
    """Words of `before` that `after` does not start with: what the reader saw disappear."""
    a, b = before.split(), after.split()
    kept = 0
    while kept < min(len(a), len(b)) and a[kept] == b[kept]:
        kept += 1
    return len(a) - kept


def flicker(interims: Sequence[str]) -> int:
    """Words retracted between consecutive interims."""
    return sum(retracted(a, b) for a, b in itertools.pairwise(interims))


def owner(spans: Sequence[Span], end_s: float) -> int:
    """The utterance a result reflecting audio up to end_s belongs to: the last one that
    started before it."""
    index = 0
    for i, span in enumerate(spans):
        if span.start_s < end_s - 1e-6:
            index = i
    return index


def analyze(
    spans: Sequence[Span], paced: PacedChunks, arrivals: Sequence[Arrival]
) -> list[UtteranceFigures]:
    """Per-utterance figures of one stream from its chunks' send times and its results."""
    late = paced.lateness_s()
    figures = []
    for span in spans:
        first = paced.chunk_at(span.start_s + 1e-6)
        last = paced.chunk_at(span.end_s)
        sent = paced.sent[first] if first < len(paced.sent) else None
        backlog = max(late[first : last + 1], default=0.0) * 1000.0
        figures.append(UtteranceFigures(span, sent, backlog_ms=backlog))
    for arrival in arrivals:
        fig = figures[owner(spans, arrival.end_s)]
        k = paced.chunk_at(arrival.end_s)
        # Never a chunk sent after the response: a result can only reflect what was sent.
        while k > 0 and (k >= len(paced.sent) or paced.sent[k] > arrival.at):
            k -= 1
        if not paced.sent:
            continue
        latency_ms = (arrival.at - paced.sent[k]) * 1000.0
        if arrival.is_final:
            if fig.final_lag_ms is not None:  # an earlier final of a cut utterance
                fig.interim_ms.append(fig.final_lag_ms)
            fig.final_lag_ms, fig.final_at, fig.timing = latency_ms, arrival.at, arrival.timing
            fig.finals.append(arrival.text)
            continue
        if fig.first_interim_ms is None and fig.first_sent is not None:
            fig.first_interim_ms = (arrival.at - fig.first_sent) * 1000.0
        fig.interim_ms.append(latency_ms)
        fig.interims.append(arrival.text)
    return figures


def behind(paced: PacedChunks, threshold_s: float) -> bool:
    """The stream fell behind real time: some chunk went out more than threshold_s late.
    Meaningless (False) with no pacing."""
    return not math.isinf(paced.pace) and max(paced.lateness_s(), default=0.0) > threshold_s
