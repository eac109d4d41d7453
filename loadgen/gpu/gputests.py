"""The GPU-marked tests (`tests/gpu`) in a child pytest, with a time limit. Each test's outcome
is read from pytest's verbose output as it prints, so a run that is killed at its limit still
reports every test that finished; a timeout, a crash or no summary at all is a failure."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
_OUTCOME = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_SUMMARY = re.compile(r"^=+ .*\b(passed|failed|error|errors|skipped|no tests ran)\b.* =+$")


def parse(lines: list[tuple[float, str]]) -> dict[str, Any]:
    """(seconds since start, line) -> per-test outcomes and whether pytest's summary came."""
    cases, last = [], 0.0
    summary = None
    for at, line in lines:
        match = _OUTCOME.match(line)
        if match:
            cases.append(
                {
                    "test": match[1].split("::", 1)[1],
                    "outcome": match[2].lower(),
                    "done_at_s": round(at, 1),
                    "s": round(at - last, 1),
                }
            )
            last = at
        elif _SUMMARY.match(line.strip()):
            summary = line.strip("= \n")
    return {
        "cases": cases,
        "passed": sum(c["outcome"] == "passed" for c in cases),
        "failed": sum(c["outcome"] in ("failed", "error") for c in cases),
        "skipped": sum(c["outcome"] == "skipped" for c in cases),
        "summary": summary,
    }


def run_tests(
    checkpoint: Path,
    audio: Path,
    device: str,
    timeout_s: float,
    dtypes: list[str] | None = None,
    clips: int = 0,
    progress: Callable[[dict[str, Any]], None] | None = None,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """pytest over tests/gpu; `progress` gets the report so far each time a test finishes (so
    the results on disk hold it even if the whole check is killed)."""
    env = {
        **os.environ,
        "WHISPER_GRPC_TEST_CHECKPOINT": str(checkpoint),
        "WHISPER_GRPC_TEST_AUDIO": str(audio),
        "WHISPER_GRPC_TEST_DEVICE": device,
    }
    if dtypes:
        env["WHISPER_GRPC_TEST_DTYPES"] = ",".join(dtypes)
    if clips:
        env["WHISPER_GRPC_TEST_CLIPS"] = str(clips)
    command = command or [
        sys.executable,
        "-m",
        "pytest",
        "-v",
        "-m",
        "gpu",
        "tests/gpu",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "-o",
        "asyncio_mode=strict",
    ]
    started = time.monotonic()
    lines: list[tuple[float, str]] = []
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - started, line.rstrip("\n")))
            if progress and _OUTCOME.match(line):
                progress({**parse(lines), "running": True})

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait()
    reader.join(timeout=5)
    out = parse(lines)
    out.update(
        exit_code=proc.returncode,
        timed_out=timed_out,
        limit_s=round(timeout_s),
        wall_s=round(time.monotonic() - started, 1),
    )
    out["tail"] = "\n".join(text for _, text in lines[-40:])[-4000:]
    return out


def failure(report: dict[str, Any]) -> str | None:
    """Why this report is a failure, or None."""
    if report["timed_out"]:
        return f"GPU tests ran past {report['limit_s']} s ({len(report['cases'])} finished)"
    if report["summary"] is None:
        return f"GPU tests gave no summary (exit {report['exit_code']})"
    if report["failed"] or report["exit_code"] not in (0, 5):
        return f"GPU tests: {report['summary']}"
    if not report["passed"]:
        return "GPU tests: none passed"
    return None
