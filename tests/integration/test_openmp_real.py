"""`python -m server`'s libgomp runs with the wait policy of server.openmp: libgomp prints the
values it read (OMP_DISPLAY_ENV) when torch loads it, here while loading a model that isn't
there (the process then exits 1, in seconds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _libgomp() -> bool:
    """Whether torch here runs on GNU OpenMP (the runtime that prints OMP_DISPLAY_ENV so)."""
    import ctypes

    import torch  # noqa: F401  (loads its OpenMP runtime)

    try:
        ctypes.CDLL("libgomp.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _libgomp(), reason="torch here does not use GNU OpenMP (libgomp)")
def test_the_servers_openmp_runtime_reads_the_active_wait_policy(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    done = subprocess.run(
        [sys.executable, "-m", "server", "--port", "0", "--metrics-port", "-1",
         "--model", str(tmp_path / "no-such-model"), "--cache-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "OpenMP wait policy: OMP_WAIT_POLICY=ACTIVE, GOMP_SPINCOUNT=300000" in done.stderr
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in done.stderr  # libgomp's own report
    assert "GOMP_SPINCOUNT = '300000'" in done.stderr
