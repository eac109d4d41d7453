"""Load generator statistics: percentiles, window selection, aggregation, stability rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadgen.report import markdown_table
from loadgen.stats import (
    DROPPED,
    OK,
    Record,
    Recorder,
    WindowStat,
    completed_in,
    in_window,
    is_stable,
    percentile,
    percentiles,
    stability_verdict,
    summarize,
)


def rec(latency_ms: float, status: str = OK, **kw) -> Record:
    fields = {
        "item_id": "u1",
        "worker": "local",
        "sent_ts": 100.0,
        "latency_ms": latency_ms,
        "status": status,
        "audio_s": 10.0,
    }
    fields.update(kw)
    return Record(**fields)


def test_percentiles_on_known_data():
    data = list(range(1, 101))  # 1..100
    assert percentiles(data, [0, 50, 90, 99, 100]) == pytest.approx([1, 50.5, 90.1, 99.01, 100])
    # Same method as numpy's default (linear interpolation between closest ranks).
    rng = np.random.default_rng(0)
    sample = rng.lognormal(6, 0.5, 997).tolist()
    for q in (50, 90, 95, 99):
        assert percentile(sample, q) == pytest.approx(float(np.percentile(sample, q)))


def test_percentiles_of_one_value_and_of_none():
    assert percentiles([42.0], [50, 99]) == [42.0, 42.0]
    assert all(math.isnan(v) for v in percentiles([], [50, 99]))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_window_holds_its_send_times_half_open():
    records = [rec(1, sent_ts=t) for t in (9.999, 10.0, 15.0, 19.999, 20.0)]
    assert [r.sent_ts for r in in_window(records, 10.0, 20.0)] == [10.0, 15.0, 19.999]


def test_summarize_counts_and_rates():
    records = [
        rec(100, queue_ms=10, infer_ms=80, server_ms=95, batch_size=1, worker="w0"),
        rec(200, queue_ms=20, infer_ms=90, server_ms=190, batch_size=3, worker="w1"),
        rec(300, queue_ms=30, infer_ms=100, server_ms=290, batch_size=2, worker="w1"),
        rec(5, status="RESOURCE_EXHAUSTED", worker="w0"),
        rec(7, status="UNAVAILABLE"),
        rec(float("nan"), status=DROPPED, late_ms=50.0),
        rec(400, late_ms=30.0, queue_ms=40, infer_ms=110, server_ms=380, batch_size=2),
    ]
    s = summarize(records, 2.0, level=3, mode="open", rate=4.0, late_ms=20.0)
    assert (s.level, s.mode, s.rate, s.concurrency) == (3, "open", 4.0, None)
    assert s.requests == 6  # dropped arrivals were never sent
    assert (s.errors, s.dropped, s.late) == (2, 1, 2)
    assert s.rps == pytest.approx(4 / 2.0)
    assert s.audio_s_per_s == pytest.approx(40.0 / 2.0)
    # Latency percentiles over successes only: a fast rejection does not make a level look quick.
    assert s.p50_ms == pytest.approx(250.0)
    assert s.max_ms == 400.0
    assert s.p50_ms <= s.p90_ms <= s.p95_ms <= s.p99_ms <= s.max_ms
    assert s.queue_p50_ms == pytest.approx(25.0)
    assert s.infer_p50_ms == pytest.approx(95.0)
    assert s.overhead_p50_ms == pytest.approx(10.0)  # latency minus server total: 5, 10, 10, 20
    assert s.batch_size_mean == pytest.approx(2.0)
    assert s.errors_by_code == {"RESOURCE_EXHAUSTED": 1, "UNAVAILABLE": 1}
    assert s.requests_by_worker == {"w0": 2, "w1": 2, "local": 2}
    assert s.wer is None  # no references given


def test_summarize_word_error_rate_uses_whisper_normalizer():
    references = {"a": "HELLO MISTER SMITH", "b": "THE COLOUR RED"}
    records = [
        rec(100, item_id="a", transcript="Hello, Mr. Smith."),  # normalizes to a perfect match
        rec(100, item_id="b", transcript="the color blue"),  # colour/color unified; one sub
        rec(100, item_id="c", transcript="no reference for this one"),
    ]
    s = summarize(records, 1.0, level=0, mode="closed", concurrency=1, references=references)
    assert s.wer == pytest.approx(1 / 6)


def test_a_level_without_measured_requests_is_marked_not_zero():
    """c=16 with a short window: every request was sent in the warm-up, none in the window
    (the bug: 0 requests, 0 req/s, a collapse on the plot)."""
    s = summarize([], 5.0, level=0, mode="closed", concurrency=16)
    assert (s.requests, s.errors, s.samples, s.measured) == (0, 0, 0, False)
    assert math.isnan(s.rps) and math.isnan(s.audio_s_per_s) and math.isnan(s.p99_ms)
    assert "NOT MEASURED" in markdown_table([s])
    # Only failures in the window: not measured either, and the errors still count.
    failed = summarize([rec(5, status="UNAVAILABLE")], 5.0, level=0, mode="closed", concurrency=1)
    assert (failed.measured, failed.errors) == (False, 1) and math.isnan(failed.rps)


def test_overloaded_open_loop_reports_goodput_below_offered_and_is_saturated():
    """Offered 2/s for 6 s (12 sent), but the server finished them over 29.7 s: only the two
    that came back inside the window count (the bug: 12/6 = 2 req/s, the run's best RTFx)."""
    t0 = 1000.0
    # Sent every 0.5 s; the server returns one every 2.8 s, the first after 2.5 s.
    window = [rec(2500 + 2300 * i, sent_ts=t0 + 0.5 * i) for i in range(12)]
    completions = completed_in(window, t0, t0 + 6.0)
    assert 0 < len(completions) < 12
    s = summarize(window, 6.0, level=0, mode="open", rate=2.0, completions=completions)
    assert s.requests == 12 and s.sent_rps == pytest.approx(2.0)
    assert s.rps == pytest.approx(len(completions) / 6.0) and s.rps < 0.5 * s.offered_rps
    assert s.audio_s_per_s == pytest.approx(10.0 * len(completions) / 6.0)
    assert s.saturated is True
    # A server that keeps up, with Poisson noise in what came back: not saturated.
    kept_up = summarize(window, 6.0, level=0, mode="open", rate=2.0, completions=window[:10])
    assert kept_up.saturated is False
    closed = summarize(window, 6.0, level=0, mode="closed", concurrency=4)
    assert closed.saturated is None and closed.offered_rps is None


def test_sample_counts_bootstrap_intervals_and_low_sample_p99():
    rng = np.random.default_rng(1)
    few = [rec(float(v)) for v in rng.normal(500, 50, 40)]
    s = summarize(few, 10.0, level=0, mode="closed", concurrency=1, seed=3)
    assert s.samples == 40 and s.p99_low_samples
    lo, hi = s.p50_ci_ms
    assert lo < s.p50_ms < hi and hi - lo < 100
    assert s.p99_ci_ms[0] <= s.p99_ms <= s.p99_ci_ms[1]
    assert s.rps_ci[0] < s.rps == 4.0 < s.rps_ci[1]
    assert "*" in markdown_table([s]).splitlines()[2]  # the p99 cell is marked
    many = summarize([rec(float(v)) for v in rng.normal(500, 50, 400)], 10.0, level=0,
                     mode="closed", concurrency=1)  # fmt: skip
    assert not many.p99_low_samples
    assert many.p50_ci_ms[1] - many.p50_ci_ms[0] < hi - lo  # more samples, tighter
    assert summarize(few, 10.0, level=0, mode="closed", seed=3).p50_ci_ms == s.p50_ci_ms


def test_timing_split_means_add_up_to_the_mean_latency():
    records = [
        rec(100, server_ms=90, prepare_ms=5, wait_ms=10, encode_ms=20, decode_ms=40, held_ms=15),
        rec(200, server_ms=180, prepare_ms=5, wait_ms=60, encode_ms=20, decode_ms=40, held_ms=55),
        rec(50, server_ms=45, prepare_ms=5, wait_ms=0, decode_ms=40, held_ms=0),  # no encode
    ]
    s = summarize(records, 1.0, level=0, mode="closed", concurrency=2)
    assert sum(s.split_mean_ms.values()) == pytest.approx(s.mean_ms)
    assert s.split_mean_ms["network"] == pytest.approx(35 / 3)
    assert s.split_p50_ms["wait"] == 10 and s.split_p50_ms["encode"] == 20
    assert s.to_row()["held_p50_ms"] == 15


def test_stability_verdict_in_words():
    steady = [WindowStat(10.0, 500.0), WindowStat(10.5, 520.0), WindowStat(9.8, 490.0)]
    assert stability_verdict(steady, True).startswith("stable after 3 windows (goodput ±")
    drifting = [*steady, WindowStat(14.0, 900.0)]
    verdict = stability_verdict(drifting, False)
    assert verdict.startswith("NOT stable after 4 windows") and "p99 ±" in verdict


def test_stability_rule_three_windows_within_tolerance():
    steady = [WindowStat(10.0, 500.0), WindowStat(10.5, 520.0), WindowStat(9.8, 480.0)]
    assert is_stable(steady, 0.10)
    assert not is_stable(steady[:2], 0.10)  # needs three
    assert not is_stable([*steady[:2], WindowStat(13.0, 500.0)], 0.10)  # throughput jumped
    assert not is_stable([*steady[:2], WindowStat(10.0, 800.0)], 0.10)  # p99 jumped
    assert is_stable([WindowStat(1.0, 9e9), *steady], 0.10)  # only the last three count
    assert not is_stable([WindowStat(0.0, float("nan"))] * 3, 0.10)


def test_recorder_keeps_only_its_own_events_and_round_trips_rows():
    recorder = Recorder()
    fields = {
        "item_id": "x",
        "worker": "w1",
        "sent_ts": 1.5,
        "latency_ms": 12.0,
        "status": OK,
        "audio_s": 3.0,
        "transcript": "hi",
    }
    recorder.on_request(request_type="grpc", name="Recognize", context={"loadgen": fields})
    recorder.on_request(request_type="GET", name="/other", context={})
    recorder.on_request(request_type="GET", name="/none")
    assert len(recorder.peek()) == 1
    rows = recorder.take_rows()
    assert recorder.take() == []
    other = Recorder()
    other.extend(rows)
    assert other.take() == [Record(**fields)]
