"""`--find-capacity`: the highest load level that meets a latency SLO, found by measuring.

The search grows the level (x2) from the one given until a level fails, then bisects between
the highest pass and the lowest failure; when the first level already fails it halves down
first. Integer levels (concurrency, streams) end when pass and fail are neighbours, rates when
they lie within `resolution` of each other. Each probe is a whole level (warm-up, window,
drain), reported like any other; the search assumes what compare assumes: capacity is
monotonic, a pass above a failure is noise.

A level meets the SLO when it was measured, nothing failed or was dropped, it did not saturate,
no stream fell behind real time, and its p99 (the p99 final lag, for streams) is within it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from loadgen.stats import LevelSummary


def meets_slo(s: LevelSummary, slo_ms: float) -> bool:
    return (
        s.measured
        and not s.errors
        and not s.dropped
        and not s.saturated
        and not s.behind_streams
        and not math.isnan(s.p99_ms)
        and s.p99_ms <= slo_ms
    )


def why_not(s: LevelSummary, slo_ms: float) -> str:
    """In words, why a level failed the SLO (empty when it passed)."""
    if meets_slo(s, slo_ms):
        return ""
    if not s.measured:
        return "not measured"
    reasons = []
    if s.errors or s.dropped:
        reasons.append(f"{s.errors} errors, {s.dropped} dropped")
    if s.saturated:
        reasons.append("saturated")
    if s.behind_streams:
        reasons.append(f"{s.behind_streams} streams behind real time")
    if s.p99_ms > slo_ms:
        reasons.append(f"p99 {s.p99_ms:.0f} ms > {slo_ms:g} ms")
    return ", ".join(reasons)


@dataclass
class Search:
    """The outcome: the capacity (None: even the lowest level failed) and every probe."""

    capacity: float | None
    tried: list[tuple[float, bool]] = field(default_factory=list)
    limited: bool = False
    """The capacity is the --max-capacity bound: the real one may be higher."""


def search(
    probe: Callable[[float], bool],
    start: float,
    *,
    integer: bool,
    limit: float,
    minimum: float = 1.0,
    resolution: float = 0.1,
) -> Search:
    """Grow, then bisect, calling probe(level) -> passed once per level."""
    result = Search(None)
    seen: dict[float, bool] = {}

    def ok(x: float) -> bool:
        if x not in seen:
            seen[x] = probe(x)
            result.tried.append((x, seen[x]))
        return seen[x]

    def step(x: float, factor: float) -> float:
        y = x * factor
        return float(math.floor(y) if factor < 1 else math.ceil(y)) if integer else y

    lo: float | None = None  # highest pass
    hi: float | None = None  # lowest failure
    x = start
    if ok(x):
        lo = x
        while lo < limit:
            x = min(step(lo, 2.0), limit)
            if not ok(x):
                hi = x
                break
            lo = x
        result.limited = hi is None
    else:
        hi = x
        while x > minimum:
            x = max(step(x, 0.5), minimum)
            if ok(x):
                lo = x
                break
            hi = x
    if lo is None or hi is None:
        result.capacity = lo
        return result
    while (hi - lo > 1) if integer else (hi > lo * (1 + resolution)):
        mid = float((lo + hi) // 2) if integer else (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    result.capacity = lo
    return result
