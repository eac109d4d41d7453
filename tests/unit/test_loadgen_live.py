"""Live streams in the load generator: real-time pacing (on a fake clock, from the recorded
send times), Riva-style latencies, attribution to utterances, flicker, falling behind."""

from __future__ import annotations

import itertools
import math

import pytest

from loadgen.live import (
    PACE_MAX,
    Arrival,
    PacedChunks,
    Span,
    analyze,
    behind,
    chunk,
    flicker,
    layout,
    owner,
    parse_pace,
    retracted,
)


class FakeClock:
    """A clock that only moves when slept on (or pushed), so pacing is checked exactly."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def paced(seconds: float, pace: float, clock: FakeClock, chunk_s: float = 0.1) -> PacedChunks:
    rate = 16_000
    pcm = bytes(2 * int(seconds * rate))
    return PacedChunks(chunk(pcm, rate, chunk_s), chunk_s, pace, clock=clock, sleep=clock.sleep)


def test_real_time_pace_sends_n_seconds_of_audio_over_n_seconds():
    clock = FakeClock()
    stream = paced(3.0, 1.0, clock)
    assert len(list(stream)) == 30
    sent = stream.sent
    assert sent[0] == stream.t0 == 100.0
    assert sent[-1] - sent[0] == pytest.approx(2.9)  # chunk k goes out at k * 100 ms
    assert [b - a for a, b in itertools.pairwise(sent)] == pytest.approx([0.1] * 29)
    assert stream.lateness_s() == pytest.approx([0.0] * 30)
    assert not behind(stream, 0.5)


def test_pace_two_is_twice_as_fast_and_max_does_not_wait():
    clock = FakeClock()
    twice = paced(3.0, 2.0, clock)
    list(twice)
    assert twice.sent[-1] - twice.sent[0] == pytest.approx(1.45)
    clock = FakeClock()
    fastest = paced(3.0, PACE_MAX, clock)
    list(fastest)
    assert fastest.sent[-1] == fastest.sent[0] and clock.slept == []


def test_a_stream_held_back_by_flow_control_is_behind_real_time():
    """gRPC takes the next chunk only when it can send it: a consumer that stalls for 0.8 s
    makes every later chunk late."""
    clock = FakeClock()
    stream = paced(2.0, 1.0, clock)
    chunks = iter(stream)
    for k in range(20):
        next(chunks)
        if k == 5:
            clock.now += 0.8  # the send of chunk 5 blocked
    late = stream.lateness_s()
    assert late[:6] == pytest.approx([0.0] * 6) and late[6] == pytest.approx(0.7)
    assert behind(stream, 0.5) and not behind(stream, 0.8)
    assert not behind(PacedChunks([b"x"], 0.1, PACE_MAX), 0.0)  # no schedule, never behind


def test_parse_pace():
    assert parse_pace("1.0") == 1.0 and parse_pace("2") == 2.0 and math.isinf(parse_pace("MAX"))
    for bad in ("0", "-1", "inf", "fast"):
        with pytest.raises(ValueError):
            parse_pace(bad)


def test_layout_puts_silence_between_utterances_and_reports_their_spans():
    a, b = bytes(2 * 16_000), bytes(2 * 8_000)  # 1 s, 0.5 s
    pcm, rate, spans = layout([(a, 16_000), (b, 16_000)], ["a", "b"], gap_s=1.5)
    assert rate == 16_000 and len(pcm) == 2 * (16_000 + 24_000 + 8_000)
    assert [(s.item_id, s.start_s, s.end_s) for s in spans] == [("a", 0, 1.0), ("b", 2.5, 3.0)]
    _, _, (one,) = layout([(bytes(2 * 8_000), 8_000)], ["c"], gap_s=0)
    assert one.audio_s == 1.0  # 8 kHz audio keeps its length at the stream's rate


def test_chunks_are_whole_samples():
    pieces = chunk(bytes(2 * 1601), 16_000, 0.1)
    assert [len(p) for p in pieces] == [3200, 2]


def test_retracted_words_and_flicker():
    assert retracted("the cat sat", "the cat sat on") == 0
    assert retracted("the cap sat", "the cat sat on") == 2
    assert flicker(["the", "the cap", "the cat sat", "the cat sat on"]) == 1


def test_owner_is_the_last_utterance_that_started_before_the_result_ends():
    spans = [Span("a", 0.0, 4.0), Span("b", 5.5, 9.0)]
    assert owner(spans, 3.0) == 0 and owner(spans, 4.7) == 0  # the endpoint's silence
    assert owner(spans, 5.5) == 0 and owner(spans, 6.0) == 1


def test_analyze_times_each_result_from_the_newest_chunk_it_reflects():
    clock = FakeClock()
    stream = paced(4.0, 1.0, clock)  # 40 chunks, chunk k sent at 100 + k / 10
    list(stream)
    spans = [Span("a", 0.0, 1.5), Span("b", 3.0, 4.0)]
    arrivals = [
        Arrival(101.25, False, "hello", end_s=1.0),  # reflects chunk 9 (sent at 100.9)
        Arrival(101.70, False, "hello word", end_s=1.5),  # chunk 14 (101.4)
        Arrival(102.50, True, "hello world", end_s=2.2),  # chunk 21 (102.1): the endpoint
        Arrival(103.60, False, "bye", end_s=3.5),  # chunk 34 (103.4), utterance b
        Arrival(104.30, True, "bye now", end_s=4.0),  # the half-close: chunk 39 (103.9)
    ]
    a, b = analyze(spans, stream, arrivals)
    assert a.first_sent == 100.0 and b.first_sent == pytest.approx(103.0)
    assert a.first_interim_ms == pytest.approx(1250)
    assert a.interim_ms == pytest.approx([350, 300])
    assert a.final_lag_ms == pytest.approx(400) and a.transcript == "hello world"
    assert a.flicker_words == 0
    assert b.first_interim_ms == pytest.approx(600) and b.interim_ms == pytest.approx([200])
    assert b.final_lag_ms == pytest.approx(400) and b.final_at == 104.30
    assert b.backlog_ms == 0.0


def test_analyze_never_times_from_a_chunk_sent_after_the_response():
    """A result whose end lies past what had been sent (rounding, resampling) is timed from
    the newest chunk sent before it arrived, never negative."""
    clock = FakeClock()
    stream = paced(2.0, 1.0, clock)
    list(stream)
    (fig,) = analyze([Span("a", 0, 2.0)], stream, [Arrival(100.55, False, "x", end_s=1.9)])
    assert fig.interim_ms == pytest.approx([50])  # chunk 5, sent at 100.5


def test_analyze_utterance_cut_in_two_keeps_the_last_final_as_its_lag():
    clock = FakeClock()
    stream = paced(3.0, 1.0, clock)
    list(stream)
    arrivals = [Arrival(101.3, True, "first half", 1.0), Arrival(103.1, True, "second", 3.0)]
    (fig,) = analyze([Span("a", 0, 3.0)], stream, arrivals)
    assert fig.transcript == "first half second"
    assert fig.final_lag_ms == pytest.approx(200) and fig.interim_ms == pytest.approx([400])


def test_analyze_with_no_results_leaves_the_utterance_without_a_final():
    clock = FakeClock()
    stream = paced(1.0, 1.0, clock)
    list(stream)
    (fig,) = analyze([Span("a", 0, 1.0)], stream, [])
    assert fig.final_at is None and fig.first_interim_ms is None and fig.transcript == ""
