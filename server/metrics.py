"""Prometheus collectors of the server, in one place, on a registry of their own.

A registry per server (not the process-global one) so that tests can run several servers in
one process. Names and meanings are listed in the README ("Metrics").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from server.batching.base import BatchStats
from server.batching.step_times import STEP_BUCKETS_S, StepTimes

# Latency buckets from 5 ms to 2 min: CPU tiny.en and GPU large-v3 both land inside. Tens of
# milliseconds apart below a second, so a GPU's p99 (a few hundred ms) is read from buckets
# within ~15% of it rather than interpolated across a 250 ms gap.
LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3,
    0.4, 0.5, 0.6, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
    60.0, 120.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "asr_requests", "Finished RPCs by method and the gRPC status their client saw (also "
            "calls that ended before a handler ran: their deadline, gRPC's own refusals).",
            ["method", "code"], registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "asr_queue_depth", "Windows waiting in the batch queue.", registry=r
        )
        self.batch_size = Histogram(
            "asr_batch_size", "Windows per model call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "asr_queue_seconds", "Time a window waited for its batch.",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.inference_seconds = Histogram(
            "asr_inference_seconds", "Wall time of one model call (a batch).",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "asr_request_seconds", "End-to-end server time of a successful request, by method "
            "(errors are counted in asr_requests only).", ["method"],
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.audio_seconds = Counter(
            "asr_audio_seconds", "Seconds of audio transcribed.", registry=r
        )
        self.batch_failures = Counter(
            "asr_batch_failures",
            "Model calls and decode steps that raised (a batch that raised is retried in pieces, "
            "so only the requests that fail alone fail).",
            registry=r,
        )

        self.active_streams = Gauge(
            "asr_active_streams", "StreamingRecognize calls in progress.", registry=r
        )
        self.stream_final_seconds = Histogram(
            "asr_stream_final_seconds",
            "Finalization latency: end of an utterance's audio on the wire to its final result.",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.stream_first_interim_seconds = Histogram(
            "asr_stream_first_interim_seconds",
            "Time from a stream's first audio to its first interim result.",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.stream_audio_seconds = Counter(
            "asr_stream_audio_seconds", "Seconds of audio received on streams.", registry=r
        )

    def observe_batch(self, stats: BatchStats) -> None:
        if stats.failures or not stats.ok:
            self.batch_failures.inc(max(stats.failures, 1))
        if stats.kind == "step":  # a failed decode step: counted above, not a model call
            return
        self.batch_size.observe(stats.size)
        self.inference_seconds.observe(stats.infer_s)
        for q in stats.queue_s:
            self.queue_seconds.observe(q)

    def watch_engine(self, stats: Callable[[], Any]) -> None:
        """Export the continuous engine's counters (`EngineStats`), read at scrape time."""
        self.registry.register(_EngineCollector(stats))

    def watch_steps(self, step_times: StepTimes | None) -> None:
        """Export the continuous engine's per-step decode times (None: no decode steps)."""
        if step_times is not None:
            self.registry.register(_StepCollector(step_times))

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP endpoint; returns the bound port (port 0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])


class _EngineCollector(Collector):
    """The continuous decode engine's own counters: it keeps running totals, and a scrape
    reads them, so the decode loop never touches a Prometheus object."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        if s is None:  # an engine without decode counters (the generate engine)
            return
        yield GaugeMetricFamily(
            "asr_decode_active_sequences", "Windows in the running decode batch.", s.active
        )
        counters = (
            ("asr_decode_steps", "Decoder steps run (rate: steps per second).", s.decode_steps),
            ("asr_decode_step_rows", "Sum over steps of the rows in each step "
             "(over asr_decode_steps: the mean decode batch).", s.step_rows),
            ("asr_decode_tokens", "Tokens generated (rate: tokens per second).",
             s.tokens_generated),
            ("asr_decode_sequences", "Windows that finished decoding.", s.sequences_finished),
            ("asr_decode_fallback_windows", "Windows decoded by generate (beam search, "
             "temperature, prompt, word times, language detection).", s.fallback_windows),
        )  # fmt: skip
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value)
        seconds = CounterMetricFamily(
            "asr_decode_seconds", "Model worker time by phase: encode (encoder and prompt "
            "passes), decode (steps), fallback (generate).", labels=["phase"],
        )  # fmt: skip
        seconds.add_metric(["encode"], s.join_s)
        seconds.add_metric(["decode"], s.decode_s)
        seconds.add_metric(["fallback"], s.fallback_s)
        yield seconds


class _StepCollector(Collector):
    """Per-step decode time by row bucket, and tokens per second, read at scrape time."""

    def __init__(self, step_times: StepTimes) -> None:
        self._times = step_times

    def collect(self) -> Iterator[Metric]:
        steps = HistogramMetricFamily(
            "asr_decode_step_seconds", "Wall time of one decode step, by its rows rounded up "
            "to a power of two (rows=\"1\": what a token costs one sequence alone).",
            labels=["rows"],
        )  # fmt: skip
        for rows, h in self._times.snapshot().items():
            cumulative, buckets = 0, []
            for bound, count in zip([*STEP_BUCKETS_S, float("inf")], h.counts, strict=True):
                cumulative += count
                buckets.append((_le(bound), cumulative))
            steps.add_metric([str(rows)], buckets, h.sum_s)
        yield steps
        yield GaugeMetricFamily(
            "asr_decode_tokens_per_second", "Tokens generated per second of decode steps, "
            "over the steps of the last 10 s.", self._times.tokens_per_second(),
        )  # fmt: skip


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
