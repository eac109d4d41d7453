"""Pacing: the Poisson schedule has the right rate and shape and is reproducible by seed."""

from __future__ import annotations

import itertools
import statistics

import pytest

from loadgen.schedule import ClosedLoop, OpenLoop, PoissonSchedule, arrivals


def test_poisson_arrivals_have_the_requested_rate():
    rate, duration = 4.0, 5_000.0
    times = arrivals(rate, duration, seed=1)
    assert len(times) / duration == pytest.approx(rate, rel=0.03)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    # Exponential gaps: the standard deviation equals the mean (a fixed pacing would give 0).
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, abs=0.05)
    assert times == sorted(times) and all(0 <= t < duration for t in times)


def test_counts_per_second_are_poisson():
    # Over 1 s bins, a Poisson process has variance equal to its mean.
    times = arrivals(3.0, 4_000.0, seed=7)
    counts = [0] * 4_000
    for t in times:
        counts[int(t)] += 1
    assert statistics.fmean(counts) == pytest.approx(3.0, rel=0.05)
    assert statistics.pvariance(counts) == pytest.approx(3.0, rel=0.1)


def test_same_seed_same_arrivals():
    assert arrivals(2.0, 100.0, seed=42) == arrivals(2.0, 100.0, seed=42)
    assert arrivals(2.0, 100.0, seed="0:1:w0:3") == arrivals(2.0, 100.0, seed="0:1:w0:3")
    assert arrivals(2.0, 100.0, seed=42) != arrivals(2.0, 100.0, seed=43)


def test_schedule_starts_at_its_start_time():
    a, b = PoissonSchedule(1.0, 5, start=0.0), PoissonSchedule(1.0, 5, start=1000.0)
    assert b.pop() - a.pop() == pytest.approx(1000.0)
    with pytest.raises(ValueError):
        PoissonSchedule(0.0, 1)


def test_open_loop_pacing_holds_its_next_arrival_until_sent():
    pacing = OpenLoop(2.0, seed=3, start=100.0)
    first = pacing.next_send(100.0)
    assert first > 100.0
    assert pacing.next_send(150.0) == first  # behind schedule: still due, never skipped
    assert pacing.wait_s(100.0) == pytest.approx(first - 100.0)
    assert pacing.wait_s(first + 5) == 0.0
    pacing.sent()
    assert pacing.next_send(first) > first
    assert not OpenLoop.blocking


def test_closed_loop_pacing_sends_at_once():
    pacing = ClosedLoop()
    assert pacing.blocking
    assert pacing.next_send(12.5) == 12.5
    assert pacing.wait_s(12.5) == 0.0
