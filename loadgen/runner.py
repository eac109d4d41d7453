"""The sweep driver: runs Locust (as a library) through the load levels and collects the results.

Per level: start the users (or tell the workers), warm up for `warmup_s`, measure for
`duration_s` (or window after window until stable, with `--stability`), then keep the load on
until every request sent in the window has returned, stop sending, and aggregate the window's
records (`loadgen.stats`). Between levels the users idle, so nothing of one level leaks into the
next. The same driver runs a single process (`LocalCoordinator`) or a Locust master with
workers (`loadgen.distributed.MasterCoordinator`); only how plans and records travel differs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import sys
import time
from typing import Any, Protocol, TextIO

import gevent
from locust.env import Environment

import loadgen
import loadgen.green
from loadgen import report
from loadgen.capacity import Search, search, why_not
from loadgen.client import check_mode_supported, make_channels, server_info, wait_until_serving
from loadgen.config import Connection, LevelPlan, RunConfig
from loadgen.dataset import Dataset, load_dataset
from loadgen.stats import (
    LOW_SAMPLES,
    LevelResult,
    LevelSummary,
    Record,
    Recorder,
    WindowStat,
    completed_in,
    in_window,
    is_stable,
    percentiles,
    stability_verdict,
    summarize,
    window_stat,
)
from loadgen.users import LoadContext, SpeechUser, bind

log = logging.getLogger(__name__)
STABLE_WINDOWS = 3


class Coordinator(Protocol):
    """How the driver reaches the users: in this process, or through a Locust master."""

    recorder: Recorder

    def begin(self, plan: LevelPlan) -> None:
        """Start the level: the right number of users, pacing by plan."""

    def settle(self, end_ts: float) -> None:
        """Return when the records of requests sent before end_ts are (as far as can be known)
        all in; the load goes on meanwhile."""

    def drain(self, end_ts: float) -> list[Record]:
        """Keep the load on until every request sent before end_ts has returned, then stop
        sending, and return every record of the level."""

    def finish(self) -> None:
        """Stop all users and Locust itself."""

    def describe(self) -> dict[str, Any] | None:
        """What summary.json says about the load generators (None: this process alone)."""


class LocalCoordinator:
    def __init__(self, env: Environment, ctx: LoadContext, drain_timeout_s: float) -> None:
        self.recorder = ctx.recorder
        self._ctx = ctx
        self._runner = env.create_local_runner()
        self._timeout_s = drain_timeout_s

    def begin(self, plan: LevelPlan) -> None:
        # Adjust the user count while the users idle, then let them all go at once.
        self._runner.start(plan.users, spawn_rate=max(plan.users, 1))
        if self._runner.spawning_greenlet is not None:
            self._runner.spawning_greenlet.join()
        self._ctx.control.begin(plan)

    def settle(self, end_ts: float) -> None:
        self._ctx.control.wait_settled(end_ts, self._timeout_s)

    def drain(self, end_ts: float) -> list[Record]:
        control = self._ctx.control
        if not control.wait_settled(end_ts, self._timeout_s):
            log.warning("requests of the window still out after %.0f s", self._timeout_s)
        control.stop_sending()
        control.wait_idle(self._timeout_s)
        return self.recorder.take()

    def finish(self) -> None:
        self._runner.quit()
        self._ctx.close()

    def describe(self) -> dict[str, Any] | None:
        return None


def run(config: RunConfig, argv: list[str]) -> tuple[int, str]:
    """`loadgen run`: the whole sweep, then the reports. Returns the exit code and the table
    to print."""
    started = dt.datetime.now(dt.timezone.utc)
    dataset = load_dataset(
        config.dataset,
        limit=config.limit,
        seed=config.seed,
        cache_dir=config.cache_dir,
        base_url=config.base_url or None,
    )
    log.info(
        "data set %s: %d files, %.0f s of audio", dataset.spec, len(dataset.items), dataset.audio_s
    )
    info = probe_server(config.connection, config.wait_ready_s)
    env = Environment(user_classes=[SpeechUser], host=config.connection.target)
    coordinator = _coordinator(config, env, dataset)
    levels = 0 if config.find_capacity else len(config.levels())
    progress = Progress(sys.stderr, config.progress_interval_s, levels)
    results: list[LevelResult] = []
    found: Search | None = None
    code = 0
    try:
        if config.find_capacity:
            found = find_capacity(config, coordinator, dataset, progress, results)
        else:
            for plan in config.levels():
                results.append(run_level(plan, config, coordinator, dataset, progress))
    except KeyboardInterrupt:
        log.warning("interrupted: reporting the %d level(s) done", len(results))
        code = 130
    finally:
        coordinator.finish()
    meta = run_metadata(config, argv, dataset, info, started, coordinator)
    if config.find_capacity:
        meta["capacity"] = capacity_meta(config, found)
    report.write_run(config.out, meta, results)
    table = report.markdown_table([r.summary for r in results])
    if config.find_capacity:
        table += "\n\n" + capacity_line(meta["capacity"])
    return code, f"{table}\n\nreport: {config.out / 'report.html'}"


def find_capacity(
    config: RunConfig,
    coordinator: Coordinator,
    dataset: Dataset,
    progress: Progress,
    results: list[LevelResult],
) -> Search:
    """--find-capacity: probe levels (each a full level, appended to results) as
    `loadgen.capacity.search` asks."""
    mode, slo_ms = config.capacity_mode, config.capacity_slo_ms

    def probe(x: float) -> bool:
        plan = config.plan_at(len(results), mode, x)
        result = run_level(plan, config, coordinator, dataset, progress)
        results.append(result)
        reason = why_not(result.summary, slo_ms)
        log.info(
            "capacity probe %s: %s",
            plan.describe(),
            f"fails ({reason})" if reason else "meets the SLO",
        )
        return not reason

    start = (config.concurrency + config.rates + config.streams)[0]
    return search(probe, float(start), integer=mode != "open", limit=config.max_capacity)


def capacity_meta(config: RunConfig, found: Search | None) -> dict[str, Any]:
    """What summary.json says about the search."""
    return {
        "mode": config.capacity_mode,
        "slo": "p99 final lag" if config.streams else "p99 latency",
        "slo_ms": config.capacity_slo_ms,
        "capacity": found.capacity if found else None,
        "limited_by_max": found.limited if found else False,
        "tried": [{"level": x, "meets_slo": ok} for x, ok in (found.tried if found else [])],
    }


def capacity_line(capacity: dict[str, Any]) -> str:
    what = {"closed": "concurrency", "open": "rate (req/s)", "stream": "streams"}[capacity["mode"]]
    tried = ", ".join(
        f"{t['level']:g}{'' if t['meets_slo'] else ' (fails)'}" for t in capacity["tried"]
    )
    if capacity["capacity"] is None:
        head = f"capacity: no level tried meets {capacity['slo']} <= {capacity['slo_ms']:g} ms"
    else:
        head = (
            f"capacity: {what} {capacity['capacity']:g} meets {capacity['slo']} <= "
            f"{capacity['slo_ms']:g} ms"
            + (" (the --max-capacity bound)" if capacity["limited_by_max"] else "")
        )
    return f"{head}; tried {tried}"


def _coordinator(config: RunConfig, env: Environment, dataset: Dataset) -> Coordinator:
    drain_timeout_s = config.connection.timeout_s + 30.0
    if config.master:
        from loadgen.distributed import MasterCoordinator

        return MasterCoordinator(env, config, dataset, drain_timeout_s)
    ctx = LoadContext(dataset, env.events.request.fire, seed=config.seed)
    env.events.request.add_listener(ctx.recorder.on_request)
    ctx.connect(config.connection)
    bind(ctx)
    return LocalCoordinator(env, ctx, drain_timeout_s)


def probe_server(conn: Connection, wait_ready_s: float) -> dict[str, Any]:
    """Wait for SERVING, read GetServerInfo, check the mode is supported."""
    channel = make_channels(dataclasses.replace(conn, channels=1))[0]
    try:
        wait_until_serving(channel, wait_ready_s, conn.api)
        info = server_info(channel, conn)
        check_mode_supported(channel, conn)
    finally:
        channel.close()
    log.info(
        "server %s: %s on %s (%s), max_batch_size %s",
        conn.target,
        info.get("model_id"),
        info.get("device_name"),
        info.get("device"),
        info.get("max_batch_size"),
    )
    return info


def run_level(
    plan: LevelPlan,
    config: RunConfig,
    coordinator: Coordinator,
    dataset: Dataset,
    progress: Progress,
) -> LevelResult:
    coordinator.begin(plan)
    begin_ts = time.time()
    first_window_ts = begin_ts + config.warmup_s
    progress.cooling_down = False
    ticker = gevent.spawn(progress.run, plan, coordinator.recorder, begin_ts, first_window_ts)
    try:
        end_ts, windows = _measure(config, coordinator, first_window_ts)
        progress.cooling_down = True
        records = coordinator.drain(end_ts)
    finally:
        ticker.kill()
    used = min(len(windows), STABLE_WINDOWS) if config.stability else 1
    measure_ts = end_ts - used * config.duration_s
    summary = summarize(
        in_window(records, measure_ts, end_ts),
        end_ts - measure_ts,
        level=plan.index,
        mode=plan.mode,
        concurrency=plan.concurrency,
        rate=plan.rate,
        references=dataset.references,
        late_ms=plan.late_ms,
        completions=completed_in(records, measure_ts, end_ts),
        seed=config.seed,
        streams=plan.streams,
    )
    summary.windows = max(len(windows), 1)
    if config.stability:
        summary.stable = is_stable(windows, config.stability_tolerance)
        summary.stability = stability_verdict(windows, summary.stable, STABLE_WINDOWS)
    _warn(plan, summary, config)
    progress.done(plan, summary)
    return LevelResult(plan, summary, records, begin_ts, first_window_ts, measure_ts, end_ts)


def _warn(plan: LevelPlan, s: LevelSummary, config: RunConfig) -> None:
    """Say what makes a level's figures weak, where the operator sees it."""
    if not s.measured:
        log.warning(
            "%s %s: no successful request was sent in the %.0f s window, so the level is "
            "not measured (plotted and tabled as such, not as 0): give --duration (and "
            "--warmup) longer than one request takes at this load",
            plan.mode, plan.describe(), s.duration_s,
        )  # fmt: skip
    elif s.saturated:
        log.warning(
            "%s %s: saturated: %.2f req/s came back of %.2f req/s offered%s; this level is "
            "past the server's capacity and is never reported as a peak",
            plan.mode, plan.describe(), s.rps, s.offered_rps or 0.0,
            f" ({s.dropped} arrivals dropped)" if s.dropped else "",
        )  # fmt: skip
    elif s.p99_low_samples:
        log.info(
            "%s %s: p99 is of %d samples (under %d): marked; a longer --duration gives a p99 "
            "worth comparing",
            plan.mode, plan.describe(), s.samples, LOW_SAMPLES,
        )  # fmt: skip
    if config.stability and not s.stable:
        log.warning("%s %s: %s", plan.mode, plan.describe(), s.stability)


def _measure(
    config: RunConfig, coordinator: Coordinator, first_window_ts: float
) -> tuple[float, list[WindowStat]]:
    """Wait out the warm-up and the window(s); return the end of the last window and, with
    --stability, the stats of every window."""
    end_ts = first_window_ts
    windows: list[WindowStat] = []
    while True:
        end_ts += config.duration_s
        gevent.sleep(max(0.0, end_ts - time.time()))
        if not config.stability:
            return end_ts, windows
        coordinator.settle(end_ts)
        start_ts = end_ts - config.duration_s
        windows.append(window_stat(coordinator.recorder.peek(), start_ts, end_ts))
        if is_stable(windows, config.stability_tolerance, STABLE_WINDOWS):
            return end_ts, windows
        if len(windows) >= config.max_windows:
            log.warning("level not stable after %d windows; reporting the last three", len(windows))
            return end_ts, windows


class Progress:
    """A line on stderr every few seconds: level, phase, elapsed, requests, p50/p99 so far."""

    def __init__(self, stream: TextIO, interval_s: float, levels: int) -> None:
        self._stream = stream
        self._interval_s = interval_s
        self._levels = levels
        self.cooling_down = False
        """Set once the window is over: the load goes on until its requests are back."""

    def run(self, plan: LevelPlan, recorder: Recorder, begin_ts: float, window_ts: float) -> None:
        while True:
            gevent.sleep(self._interval_s)
            self._write(self._line(plan, recorder.peek(), begin_ts, window_ts))

    def _line(
        self, plan: LevelPlan, records: list[Record], begin_ts: float, window_ts: float
    ) -> str:
        now = time.time()
        phase = "warmup" if now < window_ts else "cooldown" if self.cooling_down else "measure"
        since = [r for r in records if r.sent_ts >= (window_ts if now >= window_ts else begin_ts)]
        ok = [r.metric_ms for r in since if r.ok]
        p50, p99 = percentiles(ok, [50, 99])
        latency = f"p50 {p50:.0f} ms, p99 {p99:.0f} ms" if ok else "no response yet"
        return (
            f"[{plan.index + 1}/{self._levels or '?'} {plan.mode} {plan.describe()}] {phase} "
            f"{now - begin_ts:5.1f} s | {len(since)} req, {len(since) - len(ok)} err | {latency}"
        )

    def done(self, plan: LevelPlan, s: LevelSummary) -> None:
        head = f"[{plan.index + 1}/{self._levels or '?'} {plan.mode} {plan.describe()}] done: "
        if not s.measured:
            self._write(f"{head}{s.requests} req, {s.errors} err: NOT MEASURED")
            return
        if plan.mode == "stream":
            self._write(
                f"{head}{s.utterances} utterances, {s.errors} err, RTFx {s.audio_s_per_s:.1f}, "
                f"first interim p50 {s.first_interim_p50_ms:.0f} ms, final lag p50 "
                f"{s.final_lag_p50_ms:.0f} ms p99 {s.final_lag_p99_ms:.0f} ms (n={s.samples}), "
                f"{s.behind_streams} behind real time"
            )
            return
        self._write(
            f"{head}{s.requests} req, {s.errors} err, goodput {s.rps:.2f} req/s"
            + (f" of {s.offered_rps:g} offered" if s.offered_rps else "")
            + (" (SATURATED)" if s.saturated else "")
            + f", RTFx {s.audio_s_per_s:.1f}, p50 {s.p50_ms:.0f} ms, "
            f"p99 {s.p99_ms:.0f} ms (n={s.samples})" + (f", {s.stability}" if s.stability else "")
        )

    def _write(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()


def run_metadata(
    config: RunConfig,
    argv: list[str],
    dataset: Dataset,
    info: dict[str, Any],
    started: dt.datetime,
    coordinator: Coordinator,
) -> dict[str, Any]:
    conn = config.connection
    return {
        "loadgen_version": loadgen.__version__,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": ["python", "-m", "loadgen", *argv],
        "target": conn.target,
        "tls": conn.tls,
        "mode": conn.mode,
        "api": conn.api,
        "label": config.label or info.get("device_name") or conn.target,
        "price_per_hour": config.price_per_hour,
        "server_info": info,
        "dataset": dataset.describe(),
        "settings": {
            "concurrency": list(config.concurrency),
            "rates": list(config.rates),
            "streams": list(config.streams),
            "pace": "max" if config.pace == float("inf") else config.pace,
            "chunk_ms": config.chunk_ms,
            "utterances": config.utterances,
            "gap_ms": config.gap_ms,
            "behind_ms": config.behind_ms,
            "interim_interval_ms": config.interim_interval_ms,
            "find_capacity": config.find_capacity,
            "duration_s": config.duration_s,
            "warmup_s": config.warmup_s,
            "stability": config.stability,
            "max_windows": config.max_windows,
            "stability_tolerance": config.stability_tolerance,
            "limit": config.limit,
            "seed": config.seed,
            "timeout_s": conn.timeout_s,
            "channels": conn.channels,
            "max_inflight": config.max_inflight,
            "late_ms": config.late_ms,
            "generators": config.generators,
        },
        "distributed": coordinator.describe(),
    }
