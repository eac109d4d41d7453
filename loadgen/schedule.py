"""Pacing strategies: when a user sends its next request. Pure arithmetic on a clock the caller
passes in, so they are tested without gevent or a server.

* `ClosedLoop`: send when the previous response is back (the user blocks on each call), so the
  number of requests in flight is the number of users.
* `OpenLoop`: Poisson arrivals at a fixed rate, whatever the responses do (the user never blocks
  on a call). Latency is measured from the scheduled time, so a generator that falls behind
  cannot make the server look faster; how late it sent is recorded too.

A pacing answers `next_send(now)` (when the next request is due) until told `sent()`; Locust's
`User.wait_time` is `wait_s(now)`, the sleep until then; the user's task then sends.
"""

from __future__ import annotations

import random


class PoissonSchedule:
    """Arrival times of a Poisson process: exponential gaps with mean 1/rate, from a seeded
    generator so the same seed gives the same arrivals."""

    def __init__(self, rate_per_s: float, seed: int | str, start: float = 0.0) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"rate must be > 0, not {rate_per_s}")
        self.rate_per_s = rate_per_s
        self._rng = random.Random(seed)
        self._next = start + self._rng.expovariate(rate_per_s)

    def peek(self) -> float:
        """The next arrival time, without consuming it."""
        return self._next

    def pop(self) -> float:
        """The next arrival time; the one after it becomes next."""
        current = self._next
        self._next = current + self._rng.expovariate(self.rate_per_s)
        return current


def arrivals(rate_per_s: float, duration_s: float, seed: int | str) -> list[float]:
    """All arrival times in [0, duration_s)."""
    schedule = PoissonSchedule(rate_per_s, seed)
    times = []
    while schedule.peek() < duration_s:
        times.append(schedule.pop())
    return times


class ClosedLoop:
    """Send at once, then wait for the response before the next one."""

    blocking = True

    def next_send(self, now: float) -> float:
        return now

    def sent(self) -> None:
        pass

    def wait_s(self, now: float) -> float:
        return 0.0


class OpenLoop:
    """Send at Poisson arrival times without waiting for responses."""

    blocking = False

    def __init__(self, rate_per_s: float, seed: int | str, start: float) -> None:
        self.schedule = PoissonSchedule(rate_per_s, seed, start)

    def next_send(self, now: float) -> float:
        """The next arrival (the same until `sent()`), whenever it is: in the past when the
        generator runs behind."""
        return self.schedule.peek()

    def sent(self) -> None:
        self.schedule.pop()

    def wait_s(self, now: float) -> float:
        return max(0.0, self.schedule.peek() - now)


Pacing = ClosedLoop | OpenLoop
