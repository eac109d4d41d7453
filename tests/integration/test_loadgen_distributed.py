"""Distributed smoke test: one loadgen master and two workers (subprocesses, loopback) against
the real server; the master's results count requests from both workers."""

from __future__ import annotations

import csv
import json
import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from tests.conftest import LIBRISPEECH, ROOT, require_data

PORT_LINE = re.compile(r"master listening for workers on [\d.]+:(\d+)")


def start(args: list[str], stdout: IO[str] | int, stderr: IO[str] | int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "loadgen", *args],
        cwd=ROOT,
        stdout=stdout,
        stderr=stderr,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def follow(stream: IO[str]) -> tuple[queue.Queue[str], list[str]]:
    """Lines of a pipe as they come (a queue, to wait on) and all of them (for the report)."""
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def pump() -> None:
        for line in stream:
            seen.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines, seen


def wait_for_port(lines: queue.Queue[str], seen: list[str], timeout_s: float) -> int:
    while True:
        try:
            line = lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError("master never said its port:\n" + "".join(seen)) from None
        if match := PORT_LINE.search(line):
            return int(match.group(1))


def test_master_and_two_workers(real_server, tmp_path: Path):
    require_data()
    out = tmp_path / "dist"
    dataset = ["--dataset", str(LIBRISPEECH / "test-clean"), "--limit", "8", "--seed", "0"]
    master_out = (tmp_path / "master.out").open("w")
    master_args = [
        "run", "--master", "--expect-workers", "2",
        "--master-bind-host", "127.0.0.1", "--master-bind-port", "0",
        "--target", real_server.address, *dataset,
        "--concurrency", "2", "--duration", "4", "--warmup", "0",
        "--worker-timeout", "120", "--out", str(out),
    ]  # fmt: skip
    master = start(master_args, master_out, subprocess.PIPE)
    workers: list[subprocess.Popen[str]] = []
    try:
        assert master.stderr is not None
        lines, seen = follow(master.stderr)
        port = wait_for_port(lines, seen, timeout_s=120)
        for i in range(2):
            log = (tmp_path / f"worker{i}.log").open("w")
            worker_args = ["run", "--worker", "--master-host", "127.0.0.1", "--master-port"]
            workers.append(start([*worker_args, str(port), *dataset], log, subprocess.STDOUT))
        assert master.wait(timeout=300) == 0, "".join(seen)[-4000:]
        for i, worker in enumerate(workers):
            # Workers end when the master quits.
            assert worker.wait(timeout=60) == 0, (tmp_path / f"worker{i}.log").read_text()[-3000:]
    finally:
        for proc in [master, *workers]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        master_out.close()

    meta = json.loads((out / "summary.json").read_text())
    assert meta["distributed"] == {"workers": 2, "worker_names": ["w0", "w1"]}
    (level,) = meta["levels"]
    assert level["errors"] == 0 and level["requests"] >= 2
    assert sum(level["requests_by_worker"].values()) == level["requests"]
    with (out / "records.csv").open() as f:
        records = list(csv.DictReader(f))
    by_worker = {w: sum(1 for r in records if r["worker"] == w) for w in ("w0", "w1")}
    assert all(n >= 1 for n in by_worker.values()), by_worker
    assert {r["status"] for r in records} == {"OK"}
    assert level["p50_ms"] <= level["p99_ms"] and level["wer"] < 0.15


def test_a_worker_the_master_rejects_exits_with_the_masters_reason(tmp_path: Path):
    """A worker with another sample of files (--limit 3 vs the master's 2) is refused: both
    exit 2 and the worker says why, instead of waiting for a master that is gone."""
    require_data()
    from tests.integration.test_loadgen_run import serve_fake

    server, address = serve_fake()
    split = ["--dataset", str(LIBRISPEECH / "test-clean"), "--seed", "0"]
    master_args = [
        "run", "--master", "--expect-workers", "1", "--master-bind-host", "127.0.0.1",
        "--master-bind-port", "0", "--target", address, *split, "--limit", "2",
        "--concurrency", "1", "--duration", "1", "--worker-timeout", "120",
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    master = start(master_args, subprocess.DEVNULL, subprocess.PIPE)
    worker: subprocess.Popen[str] | None = None
    try:
        assert master.stderr is not None
        lines, seen = follow(master.stderr)
        port = wait_for_port(lines, seen, timeout_s=120)
        worker_args = ["run", "--worker", "--master-host", "127.0.0.1", "--master-port", str(port)]
        worker = start([*worker_args, *split, "--limit", "3"], subprocess.PIPE, subprocess.STDOUT)
        output, _ = worker.communicate(timeout=120)
        assert worker.returncode == 2, output[-3000:]
        assert "refused by the master: worker w0 loaded 3 files" in output
        assert "give every process the same --dataset, --limit and --seed" in output
        assert master.wait(timeout=60) == 2, "".join(seen)[-3000:]
    finally:
        for proc in (master, worker):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        server.stop(None).wait()
