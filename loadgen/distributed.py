"""Distributed runs on Locust's master/worker transport: one master drives the sweep, N workers
generate the load.

* `run --master --expect-workers N`: the master loads the data set (for the references), probes
  the server, waits for N workers, then per level sends the plan and the connection settings
  (`loadgen_level`), lets Locust dispatch the users, and at the level's end asks each worker to
  settle and stop (`loadgen_drain`).
* `run --worker --master-host H`: a worker loads the same data set (same `--dataset`,
  `--limit`, `--seed`; the master checks a fingerprint), runs its share of the users, and sends
  its records to the master, in Locust's periodic worker report and, at each level's end, in a
  final `loadgen_records` message. The master aggregates them exactly as in a local run.

Records carry epoch timestamps taken on the worker, so across hosts the clocks must agree (NTP)
to well under the warm-up; on one host they do by construction.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
from gevent.event import Event
from locust.env import Environment

import loadgen.green  # noqa: F401  (gevent patching before grpc is used)
from loadgen.config import Connection, LevelPlan, RunConfig
from loadgen.dataset import Dataset, load_dataset
from loadgen.errors import LoadgenError, UsageError
from loadgen.stats import Record, Recorder
from loadgen.users import LoadContext, SpeechUser, bind

log = logging.getLogger(__name__)
REPORT_LAG_S = 3.5
"""Locust workers report every 3 s; the master waits this long before trusting a window's
records to be in (the stability check only; the final numbers wait for the drain)."""


class WorkerMismatch(UsageError):
    """A worker loaded a different selection of files than the master."""


class WorkersMissing(LoadgenError):
    """Fewer workers than --expect-workers connected in time."""


class MasterCoordinator:
    def __init__(
        self, env: Environment, config: RunConfig, dataset: Dataset, drain_timeout_s: float
    ) -> None:
        self.recorder = Recorder()
        self._config = config
        self._fingerprint = dataset.fingerprint()
        self._timeout_s = drain_timeout_s
        self._runner = env.create_master_runner(config.master_bind_host, config.master_bind_port)
        self._hellos: dict[str, dict[str, Any]] = {}
        self._final: set[str] = set()
        self._level = -1
        self._changed = Event()
        self._runner.register_message("loadgen_hello", self._on_hello)
        self._runner.register_message("loadgen_records", self._on_records)
        env.events.worker_report.add_listener(self._on_report)
        host = config.master_bind_host if config.master_bind_host != "*" else "0.0.0.0"
        # Tests and scripts read the port from this line (with --master-bind-port 0).
        log.info("master listening for workers on %s:%d", host, self._runner.server.port)
        self._wait_for_workers()

    def describe(self) -> dict[str, Any]:
        return {"workers": len(self._hellos), "worker_names": sorted(self._hellos)}

    def begin(self, plan: LevelPlan) -> None:
        self._level = plan.index
        self._final = set()
        self._runner.start(plan.users, spawn_rate=max(plan.users, 1))
        self._runner.send_message(
            "loadgen_level",
            {"plan": plan.to_dict(), "connection": self._config.connection.to_dict()},
        )

    def settle(self, end_ts: float) -> None:
        gevent.sleep(max(0.0, end_ts + REPORT_LAG_S - time.time()))

    def drain(self, end_ts: float) -> list[Record]:
        self._runner.send_message("loadgen_drain", {"level": self._level, "until_ts": end_ts})
        expected = set(self._hellos)
        if not self._wait(lambda: expected <= self._final, self._timeout_s + 10):
            log.warning("no final records from %s; reporting without them", expected - self._final)
        return self.recorder.take()

    def finish(self) -> None:
        self._runner.quit()

    def _wait_for_workers(self) -> None:
        n = self._config.expect_workers
        if not self._wait(lambda: len(self._hellos) >= n, self._config.worker_timeout_s):
            missing = WorkersMissing(
                f"{len(self._hellos)} of {n} workers connected within "
                f"{self._config.worker_timeout_s:.0f} s"
            )
            self._reject(str(missing))  # the ones that came are not left waiting
            raise missing
        for name, hello in self._hellos.items():
            if hello["fingerprint"] != self._fingerprint:
                error = WorkerMismatch(
                    f"worker {name} loaded {hello['files']} files (fingerprint "
                    f"{hello['fingerprint']}) but the master {self._fingerprint}: give every "
                    "process the same --dataset, --limit and --seed"
                )
                self._reject(str(error))
                raise error
        log.info("%d workers ready: %s", n, ", ".join(sorted(self._hellos)))

    def _reject(self, reason: str) -> None:
        """Tell every worker why the run ends (a worker otherwise waits for a master that
        is gone), then let them go."""
        self._runner.send_message("loadgen_reject", {"reason": reason})
        self._runner.quit()

    def _wait(self, done: Any, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._changed.wait(remaining):
                return bool(done())
        return True

    def _on_hello(self, environment: Environment, msg: Any, **_: Any) -> None:
        self._hellos[msg.data["worker"]] = msg.data
        self._changed.set()

    def _on_records(self, environment: Environment, msg: Any, **_: Any) -> None:
        data = msg.data
        self.recorder.extend(data["records"])
        if data.get("final") and data["level"] == self._level:
            self._final.add(data["worker"])
            self._changed.set()

    def _on_report(self, client_id: str, data: dict[str, Any], **_: Any) -> None:
        rows = data.get("loadgen_records")
        if rows:
            self.recorder.extend(rows)


class Worker:
    """The worker side of the protocol: a LoadContext driven by the master's messages."""

    def __init__(self, env: Environment, runner: Any, ctx: LoadContext) -> None:
        self._runner = runner
        self._ctx = ctx
        self.rejected = ""
        """The master's reason, when it refused this worker (the run is over)."""
        runner.register_message("loadgen_reject", self.on_reject)
        runner.register_message("loadgen_level", self.on_level)
        runner.register_message("loadgen_drain", self.on_drain, concurrent=True)  # it blocks
        env.events.report_to_master.add_listener(self.on_report)

    def hello(self) -> None:
        dataset = self._ctx.dataset
        self._runner.send_message(
            "loadgen_hello",
            {
                "worker": self._ctx.worker,
                "fingerprint": dataset.fingerprint(),
                "files": len(dataset.items),
            },
        )

    def on_reject(self, environment: Environment, msg: Any, **_: Any) -> None:
        self.rejected = str(msg.data["reason"])
        log.error("the master refused this worker: %s", self.rejected)

    def on_level(self, environment: Environment, msg: Any, **_: Any) -> None:
        self._ctx.connect(Connection.from_dict(msg.data["connection"]))
        self._ctx.control.begin(LevelPlan.from_dict(msg.data["plan"]))

    def on_drain(self, environment: Environment, msg: Any, **_: Any) -> None:
        ctx = self._ctx
        timeout_s = (ctx.connection.timeout_s if ctx.connection else 120.0) + 30.0
        ctx.control.wait_settled(msg.data["until_ts"], timeout_s)
        ctx.control.stop_sending()
        ctx.control.wait_idle(timeout_s)
        records = ctx.recorder.take_rows()
        final = {"worker": ctx.worker, "level": msg.data["level"], "final": True}
        self._runner.send_message("loadgen_records", {**final, "records": records})

    def on_report(self, client_id: str, data: dict[str, Any], **_: Any) -> None:
        """Locust's periodic worker report carries the records made since the last one."""
        data["loadgen_records"] = self._ctx.recorder.take_rows()


def run_worker(
    master_host: str,
    master_port: int,
    dataset_spec: str,
    *,
    limit: int | None,
    seed: int,
    cache_dir: Any,
    base_url: str | None,
) -> int:
    """`loadgen run --worker`: serve the master until it quits. Returns the exit code."""
    dataset = load_dataset(
        dataset_spec, limit=limit, seed=seed, cache_dir=cache_dir, base_url=base_url
    )
    env = Environment(user_classes=[SpeechUser])
    runner = env.create_worker_runner(master_host, master_port)  # returns once connected
    ctx = LoadContext(dataset, env.events.request.fire, worker=f"w{runner.worker_index}", seed=seed)
    env.events.request.add_listener(ctx.recorder.on_request)
    bind(ctx)
    worker = Worker(env, runner, ctx)
    worker.hello()
    log.info("worker %s connected to %s:%d", ctx.worker, master_host, master_port)
    runner.greenlet.join()
    ctx.close()
    if worker.rejected:
        raise WorkerMismatch(f"refused by the master: {worker.rejected}")
    return 0
