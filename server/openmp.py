"""How torch's OpenMP threads wait between kernels, set before torch loads.

A decode step is about a hundred small kernels, each an OpenMP parallel region on the model
worker's team. Between two regions the team's threads wait: libgomp spins a while, then sleeps
on a futex, and a sleeping thread must be woken for the next kernel. How long it spins depends
on whether libgomp counts more OpenMP threads in the process than CPUs: then only 100 spins
with the default policy, 1,000 with `OMP_WAIT_POLICY=ACTIVE` (its documented `GOMP_SPINCOUNT`
rule). The server is in that case (an idle server with ACTIVE uses no CPU, so libgomp spins
the short count), and its two cores also carry gRPC's and the event loop's threads.

Measured on a 2-vCPU EPYC (AVX512-BF16), tiny.en bf16, compiled step, one active sequence:
the same step alone in a process costs 5.5-7.3 ms (on the first thread or on a worker thread);
in the server 8.7-10.8 ms with the default policy and 6.7-7.3 ms with ACTIVE, in three
interleaved pairs of runs (c1: 2.55-2.72 files/s against 2.05-2.35). Giving the feature-extraction
threads one OpenMP thread each (so the worker's team is the only one) changed nothing
measurable, so it is not done. What exactly makes the default slower in the server (the
wake-up of a sleeping thread while other threads are runnable on the two cores is the likely
cost) was not traced further.

`GOMP_SPINCOUNT=300000` keeps the spin where libgomp's default puts it when it does not count
the CPUs as oversubscribed (ACTIVE alone would then spin 30 billion times: cores busy long after
the work ended). Either way an idle server sleeps.

libgomp reads the environment once, when torch loads it, so `tune_openmp()` runs first thing
in `python -m server` and in `python -m loadgen`'s in-process commands (whose servers run their
models on a worker thread too). An operator's own `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT`
wins: then nothing is changed. Other OpenMP runtimes (Intel's, LLVM's) read `OMP_WAIT_POLICY`
too and ignore `GOMP_SPINCOUNT`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

WAIT_POLICY = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


def tune_openmp(environ: MutableMapping[str, str] | None = None) -> str:
    """Set the wait policy in `environ` (the process's by default) unless the operator set
    either variable. Returns a line for the log saying what holds and why."""
    env = os.environ if environ is None else environ
    own = {k: env[k] for k in WAIT_POLICY if k in env}
    if not own:
        env.update(WAIT_POLICY)
    late = not own and environ is None and "torch" in sys.modules
    return (
        f"OpenMP wait policy{' from the environment' if own else ''}: "
        + ", ".join(f"{k}={v}" for k, v in (own or WAIT_POLICY).items())
        + (" (too late: torch was already loaded)" if late else "")
    )
