"""Statistics: one `Record` per request, and aggregation done apart from recording.

The protocol client (`loadgen.client`) times one call and fires one Locust request event whose
context carries the request's fields; `Recorder.on_request` turns that into a `Record` and
keeps it. Nothing is aggregated on the fly: percentiles come from the recorded latencies,
errors are counted by gRPC status code, and WER is computed on the returned transcripts, all
after the level, from whichever records fall in its measurement window.

Window rule: a request belongs to the window that holds its send time (its *scheduled* send time
in open loop), and the level keeps its load on until every such request has returned, so the
last requests of a window see the same load as the first ones. Latency percentiles are of the
window's successful requests (their count, `samples`, goes with every percentile, with
bootstrap intervals); throughput is goodput, the successful responses that *arrived* in the
window, whenever they were sent, so an overloaded open loop reports what the server managed
and not what it was offered.
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
    # The server's split of server_ms (ServerTiming fields 7-11; NaN from servers without it):
    # prepare (decode audio, features), wait (queued), encode, decode, held up by others.
    prepare_ms: float = NAN
    wait_ms: float = NAN
    encode_ms: float = NAN
    decode_ms: float = NAN
    held_ms: float = NAN
    # Live streams (one record per utterance; latency_ms runs from its first chunk sent to
    # its final's arrival, so done_ts is the final's arrival):
    stream: str = ""
    """Stream id (`<worker>:<n>`); empty for unary calls."""
    first_interim_ms: float = NAN
    """From the utterance's first chunk sent to its first interim result."""
    interim_ms: tuple[float, ...] = ()
    """Latency of every interim (arrival minus send time of the newest chunk it reflects)."""
    final_lag_ms: float = NAN
    """Arrival of the final minus the send time of the newest chunk it reflects."""
    flicker_words: int = 0
    """Words retracted between consecutive interims."""
    backlog_ms: float = NAN
    """Largest lateness of the utterance's chunks against their real-time schedule."""
    behind: bool = False
    """Its stream fell behind real time (a chunk more than --behind-ms late)."""

    def __post_init__(self) -> None:
        if not isinstance(self.interim_ms, tuple):  # a list, after msgpack
            object.__setattr__(self, "interim_ms", tuple(self.interim_ms))

    @property
    def metric_ms(self) -> float:
        """The latency percentiles are of: final lag for a stream's utterance, else the
        call's latency."""
        return self.final_lag_ms if self.stream else self.latency_ms

    @property
    def done_ts(self) -> float:
        """Epoch seconds of the response (or error)."""
        return self.sent_ts + self.latency_ms / 1000.0

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


LOW_SAMPLES = 100
"""Below this many samples a p99 is about the largest one or two values: it is marked."""
SPLIT = ("prepare", "wait", "encode", "decode", "held")
"""The server's timing split (Record fields `<name>_ms`), in the order a request lives it."""


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
    """Goodput: successful responses that *arrived* in the window, per second of window
    (whenever they were sent). NaN when the level was not measured."""
    audio_s_per_s: float
    """Seconds of audio of those responses per second of window: the RTFx achieved."""
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
    samples: int = 0
    """Successful requests sent in the window: the sample every latency percentile is of."""
    measured: bool = True
    """False when no request sent in the window succeeded: no figure of this level means
    anything (the window is shorter than one request, or everything failed)."""
    offered_rps: float | None = None
    """Open loop: the arrival rate asked for. Closed loop: None (the load follows the server)."""
    sent_rps: float = NAN
    """Requests sent (or scheduled, open loop) in the window, per second."""
    saturated: bool | None = None
    """Open loop: the server did not keep up (goodput short of the offered rate beyond
    Poisson noise, or arrivals dropped). Never a peak or an SLO point. None in closed loop."""
    rps_ci: tuple[float, float] = (NAN, NAN)
    """95% interval of the goodput (the completions as a Poisson count)."""
    p50_ci_ms: tuple[float, float] = (NAN, NAN)
    p99_ci_ms: tuple[float, float] = (NAN, NAN)
    """95% bootstrap intervals of p50 and p99."""
    p99_low_samples: bool = False
    """Fewer than LOW_SAMPLES samples: the p99 is marked in every table."""
    split_p50_ms: dict[str, float] = field(default_factory=dict)
    """Medians of the server's timing split (prepare, wait, encode, decode, held)."""
    split_mean_ms: dict[str, float] = field(default_factory=dict)
    """Means of the split plus `network` (latency - server total): these add up to mean_ms."""
    windows: int = 1
    stable: bool | None = None
    stability: str = ""
    """With --stability: the verdict in words (windows used, spread of the last three)."""
    errors_by_code: dict[str, int] = field(default_factory=dict)
    requests_by_worker: dict[str, int] = field(default_factory=dict)
    # Live streams (mode `stream`): a request is an utterance, and p50_ms..max_ms (with their
    # intervals, and what an SLO is checked on) are of the final lag.
    streams: int | None = None
    utterances: int = 0
    """Utterances whose first chunk went out in the window (= requests)."""
    first_interim_p50_ms: float = NAN
    first_interim_p99_ms: float = NAN
    interim_p50_ms: float = NAN
    interim_p99_ms: float = NAN
    final_lag_p50_ms: float = NAN
    final_lag_p90_ms: float = NAN
    final_lag_p99_ms: float = NAN
    final_lag_max_ms: float = NAN
    flicker_words: float = NAN
    """Words retracted between consecutive interims, per utterance (mean)."""
    behind_streams: int = 0
    """Streams of the window that fell behind real time."""
    no_interim: int = 0
    """Successful utterances that got no interim result before their final."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_row(self) -> dict[str, Any]:
        """to_dict with the split's medians as columns of their own (`wait_p50_ms`...)."""
        row = self.to_dict()
        row.update({f"{k}_p50_ms": v for k, v in self.split_p50_ms.items()})
        return row


STREAM_CSV_COLUMNS = [
    "mode",
    "streams",
    "measured",
    "utterances",
    "samples",
    "errors",
    "first_interim_p50_ms",
    "first_interim_p99_ms",
    "interim_p50_ms",
    "interim_p99_ms",
    "final_lag_p50_ms",
    "final_lag_p90_ms",
    "final_lag_p99_ms",
    "final_lag_max_ms",
    "p99_ci_ms",
    "p99_low_samples",
    "wer",
    "flicker_words",
    "behind_streams",
    "no_interim",
    "audio_s_per_s",
    "rps",
    "queue_p50_ms",
    "infer_p50_ms",
    *(f"{name}_p50_ms" for name in SPLIT),
    "batch_size_mean",
    "duration_s",
    "windows",
    "stable",
    "stability",
    "errors_by_code",
]
"""summary.csv of a stream run: the final-lag columns are p50_ms..max_ms of a unary run."""

CSV_COLUMNS = [
    "mode",
    "concurrency",
    "rate",
    "measured",
    "saturated",
    "requests",
    "samples",
    "errors",
    "dropped",
    "late",
    "offered_rps",
    "sent_rps",
    "rps",
    "rps_ci",
    "audio_s_per_s",
    "p50_ms",
    "p50_ci_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "p99_ci_ms",
    "p99_low_samples",
    "max_ms",
    "mean_ms",
    "wer",
    "queue_p50_ms",
    "queue_p99_ms",
    "infer_p50_ms",
    *(f"{name}_p50_ms" for name in SPLIT),
    "overhead_p50_ms",
    "batch_size_mean",
    "duration_s",
    "windows",
    "stable",
    "stability",
    "errors_by_code",
]


def in_window(records: Iterable[Record], start_ts: float, end_ts: float) -> list[Record]:
    """Records whose (scheduled) send time lies in [start_ts, end_ts)."""
    return [r for r in records if start_ts <= r.sent_ts < end_ts]


def completed_in(records: Iterable[Record], start_ts: float, end_ts: float) -> list[Record]:
    """Successful records whose response arrived in [start_ts, end_ts): what goodput counts."""
    return [r for r in records if r.ok and start_ts <= r.done_ts < end_ts]


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
    completions: Sequence[Record] | None = None,
    seed: int = 0,
    streams: int | None = None,
) -> LevelSummary:
    """Aggregate one window's records (those sent in it). Latency percentiles are over
    successful requests only, so a fast rejection cannot make a level look quick.

    Throughput is goodput: `completions` are the level's successful responses that arrived
    in the window (`completed_in`; default: the window's successes, for a window that ran to
    the end of every request). Counting sends instead would credit an overloaded open loop
    with the rate it was offered."""
    sent = [r for r in records if r.status != DROPPED]
    ok = [r for r in sent if r.ok]
    done = ok if completions is None else completions
    latencies = [r.metric_ms for r in ok]
    p50, p90, p95, p99, p100 = percentiles(latencies, [50, 90, 95, 99, 100])
    timed = [r for r in ok if not math.isnan(r.server_ms)]
    measured = bool(ok)
    rps = len(done) / duration_s if measured else NAN
    dropped = len(records) - len(sent)
    return LevelSummary(
        level=level,
        mode=mode,
        concurrency=concurrency,
        rate=rate,
        requests=len(sent),
        errors=len(sent) - len(ok),
        dropped=dropped,
        late=sum(1 for r in records if r.late_ms > late_ms),
        duration_s=duration_s,
        rps=rps,
        audio_s_per_s=sum(r.audio_s for r in done) / duration_s if measured else NAN,
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
        overhead_p50_ms=percentile((r.metric_ms - r.server_ms for r in timed), 50),
        batch_size_mean=_mean([float(r.batch_size) for r in timed]),
        samples=len(ok),
        measured=measured,
        offered_rps=rate if mode == "open" else None,
        sent_rps=(len(records) if mode == "open" else len(sent)) / duration_s,
        saturated=is_saturated(len(done), rate, duration_s, dropped) if mode == "open" else None,
        rps_ci=poisson_interval(len(done), duration_s) if measured else (NAN, NAN),
        p50_ci_ms=bootstrap_interval(latencies, 50, seed),
        p99_ci_ms=bootstrap_interval(latencies, 99, seed),
        p99_low_samples=len(ok) < LOW_SAMPLES,
        split_p50_ms=_split(timed, lambda xs: percentile(xs, 50)),
        split_mean_ms=_split_means(timed),
        errors_by_code=dict(Counter(r.status for r in sent if not r.ok)),
        requests_by_worker=dict(Counter(r.worker for r in sent)),
        **(_stream_figures(sent, ok, streams) if mode == "stream" else {}),
    )


def _stream_figures(
    sent: Sequence[Record], ok: Sequence[Record], streams: int | None
) -> dict[str, Any]:
    """The stream columns of a level: first interim, interim latency, final lag, flicker,
    streams behind real time (of every utterance sent, failed ones included: a stream that
    fell behind and then failed fell behind all the same)."""
    first = [r.first_interim_ms for r in ok if not math.isnan(r.first_interim_ms)]
    interims = [ms for r in ok for ms in r.interim_ms]
    lags = [r.final_lag_ms for r in ok]
    fi50, fi99 = percentiles(first, [50, 99])
    i50, i99 = percentiles(interims, [50, 99])
    f50, f90, f99, f100 = percentiles(lags, [50, 90, 99, 100])
    return {
        "streams": streams,
        "utterances": len(sent),
        "first_interim_p50_ms": fi50,
        "first_interim_p99_ms": fi99,
        "interim_p50_ms": i50,
        "interim_p99_ms": i99,
        "final_lag_p50_ms": f50,
        "final_lag_p90_ms": f90,
        "final_lag_p99_ms": f99,
        "final_lag_max_ms": f100,
        "flicker_words": _mean([float(r.flicker_words) for r in ok]),
        "behind_streams": len({r.stream for r in sent if r.behind}),
        "no_interim": sum(1 for r in ok if math.isnan(r.first_interim_ms)),
    }


def _split(records: Sequence[Record], stat: Any) -> dict[str, float]:
    out = {}
    for name in SPLIT:
        values = [getattr(r, f"{name}_ms") for r in records]
        values = [v for v in values if not math.isnan(v)]
        out[name] = stat(values) if values else NAN
    return out


def _split_means(records: Sequence[Record]) -> dict[str, float]:
    """Means of the split and of the network share; an engine that leaves a part unset
    (encode, with the generate engine) contributes 0 to it, so the parts still add up."""
    if not records:
        return {}
    out = {}
    for name in SPLIT:
        values = [getattr(r, f"{name}_ms") for r in records]
        out[name] = _mean([0.0 if math.isnan(v) else v for v in values])
    out["network"] = _mean([r.metric_ms - r.server_ms for r in records])
    return out


def is_saturated(completed: int, rate: float | None, duration_s: float, dropped: int) -> bool:
    """An open-loop level whose server did not keep up: arrivals were dropped, or fewer
    responses came back than were offered by more than 10% and more than Poisson noise (two
    standard deviations of the offered count), so a short window does not cry wolf."""
    if dropped:
        return True
    expected = (rate or 0.0) * duration_s
    shortfall = expected - completed
    return shortfall > 0.10 * expected and shortfall >= 2 * math.sqrt(expected)


def poisson_interval(count: int, duration_s: float) -> tuple[float, float]:
    """95% interval of a rate from a count: the score interval of a Poisson mean, k + z²/2 ±
    z·sqrt(k + z²/4), which stays honest for small counts (0 gives [0, 3.8]/duration). It
    overstates the spread of the steadier closed loop: on the safe side."""
    z = 1.96
    centre, half = count + z * z / 2, z * math.sqrt(count + z * z / 4)
    return (max(0.0, centre - half) / duration_s, (centre + half) / duration_s)


def bootstrap_interval(
    values: Sequence[float], q: float, seed: int = 0, resamples: int = 1000
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the q-th percentile (NaN with under 2 values)."""
    if len(values) < 2:
        return (NAN, NAN)
    import numpy as np

    xs = np.asarray(values, dtype=np.float64)
    resamples = max(200, min(resamples, 5_000_000 // len(xs)))  # bounded memory
    rng = np.random.default_rng(seed)
    stats = np.percentile(xs[rng.integers(0, len(xs), (resamples, len(xs)))], q, axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return (float(lo), float(hi))


def word_error_rate(records: Sequence[Record], references: Mapping[str, str]) -> float | None:
    """Corpus WER of the transcripts against the references, with Whisper's English normalizer
    (loadgen.wer). Every request counts, replays included; None without references."""
    pairs = [(references[r.item_id], r.transcript) for r in records if r.item_id in references]
    if not pairs:
        return None
    from loadgen.wer import word_error_rate as wer  # transformers: import only when used

    return wer([ref for ref, _ in pairs], [hyp for _, hyp in pairs])


@dataclass(frozen=True)
class WindowStat:
    """What the stability rule compares between consecutive windows."""

    rps: float
    p99_ms: float


def window_stat(records: Sequence[Record], start_ts: float, end_ts: float) -> WindowStat:
    """Goodput (responses that arrived in the window) and the p99 of requests sent in it."""
    ok = [r.metric_ms for r in in_window(records, start_ts, end_ts) if r.ok]
    return WindowStat(
        len(completed_in(records, start_ts, end_ts)) / (end_ts - start_ts), percentile(ok, 99)
    )


def stability_verdict(windows: Sequence[WindowStat], stable: bool, count: int = 3) -> str:
    """The --stability verdict of a level in words: how many windows it took, and how far
    the last `count` spread (largest distance from their mean) on goodput and p99."""
    last = windows[-count:]
    spreads = []
    for name, values in (("goodput", [w.rps for w in last]), ("p99", [w.p99_ms for w in last])):
        mean = sum(values) / len(values) if values else NAN
        if not values or math.isnan(mean) or mean <= 0:
            spreads.append(f"{name} not measured")
        else:
            spreads.append(f"{name} ±{max(abs(v - mean) for v in values) / mean:.0%}")
    verdict = "stable" if stable else "NOT stable"
    return f"{verdict} after {len(windows)} windows ({', '.join(spreads)})"


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
