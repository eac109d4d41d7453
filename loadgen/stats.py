"""Statistics: one `Record` per request, and aggregation done apart from recording.

The protocol client (`loadgen.client`) times one call and fires one Locust request event whose
context carries the request's fields; `Recorder.on_request` turns that into a `Record` and
keeps it. Nothing is aggregated on the fly: percentiles come from the recorded latencies,
errors are counted by gRPC status code, and WER is computed on the returned transcripts, all
after the level, from whichever records fall in its measurement window.

Window rule: a request belongs to the window that holds its send time (its *scheduled* send time
in open loop), and the level keeps its load on until every such request has returned, so the
last requests of a window see the same load as the first ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loadgen.config import LevelPlan

OK = "OK"
DROPPED = "DROPPED"
"""Status of an open-loop arrival the generator did not send (too many calls in flight)."""
NAN = float("nan")


@dataclass(frozen=True)
class Record:
    """One request as the client saw it, plus the server's own timing of it."""

    item_id: str
    """Utterance id of the audio sent."""
    worker: str
    """Process that sent it: `local`, or `w<index>` in distributed runs."""
    sent_ts: float
    """Epoch seconds of the (scheduled, in open loop) send."""
    latency_ms: float
    """From `sent_ts` to the response or error; NaN when dropped."""
    status: str
    """`OK`, the gRPC status code name (`UNAVAILABLE`...), or `DROPPED`."""
    audio_s: float
    """Duration of the audio sent."""
    transcript: str = ""
    queue_ms: float = NAN
    infer_ms: float = NAN
    server_ms: float = NAN
    batch_size: int = 0
    windows: int = 0
    late_ms: float = 0.0
    """How long after its scheduled time the generator actually sent it (open loop)."""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_row(self) -> list[Any]:
        return list(dataclasses.astuple(self))

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Record:
        return cls(*row)


FIELDS = [f.name for f in dataclasses.fields(Record)]


class Recorder:
    """Keeps every request's record. Attach `on_request` to Locust's request event."""

    def __init__(self) -> None:
        self._records: list[Record] = []

    def on_request(self, context: Mapping[str, Any] | None = None, **_: Any) -> None:
        fields = (context or {}).get("loadgen")
        if fields is not None:  # requests of other clients are not ours to record
            self._records.append(Record(**fields))

    def extend(self, rows: Iterable[Sequence[Any]]) -> None:
        """Records that another process recorded (distributed runs)."""
        self._records.extend(Record.from_row(row) for row in rows)

    def take(self) -> list[Record]:
        """Everything recorded since the last take."""
        taken, self._records = self._records, []
        return taken

    def take_rows(self) -> list[list[Any]]:
        """`take` as plain rows, for sending to the master."""
        return [r.to_row() for r in self.take()]

    def peek(self) -> list[Record]:
        """Records so far, without taking them (progress display)."""
        return list(self._records)


def percentiles(values: Iterable[float], qs: Sequence[float]) -> list[float]:
    """Percentiles (0..100) with linear interpolation between closest ranks (numpy's default
    method); NaN for no values."""
    xs = sorted(values)
    if not xs:
        return [NAN for _ in qs]
    out = []
    for q in qs:
        if not 0 <= q <= 100:
            raise ValueError(f"percentile must be in [0, 100], not {q}")
        pos = (len(xs) - 1) * q / 100
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


def percentile(values: Iterable[float], q: float) -> float:
    return percentiles(values, [q])[0]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else NAN


@dataclass
class LevelSummary:
    """One row of summary.csv: a load level's measurement window, aggregated."""

    level: int
    mode: str
    concurrency: int | None
    rate: float | None
    requests: int
    """Requests sent in the window (successes and errors; drops excluded)."""
    errors: int
    dropped: int
    late: int
    duration_s: float
    rps: float
    """Successful responses per second of window."""
    audio_s_per_s: float
    """Seconds of audio transcribed per second of window: the RTFx."""
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    wer: float | None
    queue_p50_ms: float
    queue_p99_ms: float
    infer_p50_ms: float
    overhead_p50_ms: float
    """Client latency minus the server's total time: network, serialization, client."""
    batch_size_mean: float
    windows: int = 1
    stable: bool | None = None
    errors_by_code: dict[str, int] = field(default_factory=dict)
    requests_by_worker: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CSV_COLUMNS = [
    "mode",
    "concurrency",
    "rate",
    "requests",
    "errors",
    "dropped",
    "late",
    "rps",
    "audio_s_per_s",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "mean_ms",
    "wer",
    "queue_p50_ms",
    "queue_p99_ms",
    "infer_p50_ms",
    "overhead_p50_ms",
    "batch_size_mean",
    "duration_s",
    "windows",
    "stable",
    "errors_by_code",
]


def in_window(records: Iterable[Record], start_ts: float, end_ts: float) -> list[Record]:
    """Records whose (scheduled) send time lies in [start_ts, end_ts)."""
    return [r for r in records if start_ts <= r.sent_ts < end_ts]


def summarize(
    records: Sequence[Record],
    duration_s: float,
    *,
    level: int,
    mode: str,
    concurrency: int | None = None,
    rate: float | None = None,
    references: Mapping[str, str] | None = None,
    late_ms: float = 20.0,
) -> LevelSummary:
    """Aggregate one window's records. Latency percentiles are over successful requests only,
    so a fast rejection cannot make a level look quick."""
    sent = [r for r in records if r.status != DROPPED]
    ok = [r for r in sent if r.ok]
    latencies = [r.latency_ms for r in ok]
    p50, p90, p95, p99, p100 = percentiles(latencies, [50, 90, 95, 99, 100])
    timed = [r for r in ok if not math.isnan(r.server_ms)]
    return LevelSummary(
        level=level,
        mode=mode,
        concurrency=concurrency,
        rate=rate,
        requests=len(sent),
        errors=len(sent) - len(ok),
        dropped=len(records) - len(sent),
        late=sum(1 for r in records if r.late_ms > late_ms),
        duration_s=duration_s,
        rps=len(ok) / duration_s,
        audio_s_per_s=sum(r.audio_s for r in ok) / duration_s,
        p50_ms=p50,
        p90_ms=p90,
        p95_ms=p95,
        p99_ms=p99,
        max_ms=p100,
        mean_ms=_mean(latencies),
        wer=word_error_rate(ok, references) if references else None,
        queue_p50_ms=percentile((r.queue_ms for r in timed), 50),
        queue_p99_ms=percentile((r.queue_ms for r in timed), 99),
        infer_p50_ms=percentile((r.infer_ms for r in timed), 50),
        overhead_p50_ms=percentile((r.latency_ms - r.server_ms for r in timed), 50),
        batch_size_mean=_mean([float(r.batch_size) for r in timed]),
        errors_by_code=dict(Counter(r.status for r in sent if not r.ok)),
        requests_by_worker=dict(Counter(r.worker for r in sent)),
    )


def word_error_rate(records: Sequence[Record], references: Mapping[str, str]) -> float | None:
    """Corpus WER of the transcripts against the references, with Whisper's English normalizer
    (server.evaluation). Every request counts, replays included; None without references."""
    pairs = [(references[r.item_id], r.transcript) for r in records if r.item_id in references]
    if not pairs:
        return None
    from server.evaluation import word_error_rate as wer  # transformers: import only when used

    return wer([ref for ref, _ in pairs], [hyp for _, hyp in pairs])


@dataclass(frozen=True)
class WindowStat:
    """What the stability rule compares between consecutive windows."""

    rps: float
    p99_ms: float


def window_stat(records: Sequence[Record], duration_s: float) -> WindowStat:
    ok = [r.latency_ms for r in records if r.ok]
    return WindowStat(len(ok) / duration_s, percentile(ok, 99))


def is_stable(windows: Sequence[WindowStat], tolerance: float = 0.10, count: int = 3) -> bool:
    """perf_analyzer's rule: the last `count` windows each lie within `tolerance` of their mean,
    on throughput and on p99 latency."""
    if len(windows) < count:
        return False
    last = windows[-count:]
    for values in ([w.rps for w in last], [w.p99_ms for w in last]):
        if any(math.isnan(v) for v in values):
            return False
        mean = sum(values) / count
        if mean <= 0 or any(abs(v - mean) > tolerance * mean for v in values):
            return False
    return True


@dataclass
class LevelResult:
    plan: LevelPlan
    summary: LevelSummary
    records: list[Record]
    begin_ts: float
    """Start of the warm-up."""
    first_window_ts: float
    """End of the warm-up: the first measurement window starts here."""
    measure_ts: float
    """Start of the windows the summary covers (the last three, with --stability)."""
    end_ts: float

    def phase(self, record: Record) -> str:
        if record.sent_ts < self.first_window_ts:
            return "warmup"
        if record.sent_ts < self.measure_ts:
            return "discarded"  # an early window of a --stability search
        return "measure" if record.sent_ts < self.end_ts else "cooldown"
