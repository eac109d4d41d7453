"""Per-process level control: what the users of this process should do now, and which of their
calls are still out.

Users block in `wait_for_work()` between levels. A level starts with `begin(plan)`; at its end
the driver calls `wait_settled(t1)` (load goes on until every call sent, or scheduled, before
t1 has returned: the window's last requests see the same load as its first ones), then
`stop_sending()` and `wait_idle()`. Open-loop generators reserve their next arrival ahead of
time, so a generator running behind schedule still holds back the settling.

Runs under gevent (Locust's process): one thread, so no locks; waits are gevent events.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gevent.event import Event

from loadgen.config import LevelPlan


class Control:
    def __init__(self) -> None:
        self._plan: LevelPlan | None = None
        self._sending = Event()
        self._changed = Event()
        self._tokens: dict[int, tuple[float, bool]] = {}  # token -> (send epoch s, sent yet)
        self._next_token = 0

    @property
    def plan(self) -> LevelPlan | None:
        return self._plan

    @property
    def sending(self) -> bool:
        return self._sending.is_set()

    def begin(self, plan: LevelPlan) -> None:
        self._plan = plan
        self._sending.set()

    def wait_for_work(self) -> LevelPlan:
        """Block until a level is running; return its plan."""
        self._sending.wait()
        assert self._plan is not None
        return self._plan

    def reserve(self, send_ts: float) -> int | None:
        """Register a call that will be sent at send_ts (epoch s); None once sending stopped."""
        if not self.sending:
            return None
        self._next_token += 1
        self._tokens[self._next_token] = (send_ts, False)
        return self._next_token

    def start(self, token: int) -> bool:
        """Mark a reserved call as sent; False if the level ended while it waited."""
        if token not in self._tokens:
            return False
        self._tokens[token] = (self._tokens[token][0], True)
        return True

    def release(self, token: int) -> None:
        """The call returned (or was dropped)."""
        self._tokens.pop(token, None)
        self._changed.set()

    @property
    def inflight(self) -> int:
        return sum(1 for _, sent in self._tokens.values() if sent)

    def wait_settled(self, before_ts: float, timeout_s: float) -> bool:
        """Wait until no call sent or scheduled before before_ts is out."""
        return self._wait(
            lambda: all(ts >= before_ts for ts, _ in self._tokens.values()), timeout_s
        )

    def stop_sending(self) -> None:
        """End the level: users finish their current call and then wait for the next level;
        reserved arrivals that were not sent yet are forgotten."""
        self._sending.clear()
        self._tokens = {t: v for t, v in self._tokens.items() if v[1]}
        self._changed.set()

    def wait_idle(self, timeout_s: float) -> bool:
        return self._wait(lambda: not self._tokens, timeout_s)

    def _wait(self, done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            self._changed.clear()  # no greenlet switch between the check and the clear
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._changed.wait(remaining):
                return done()
        return True
