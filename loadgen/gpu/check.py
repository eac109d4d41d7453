"""The first-GPU check: one run, one JSON file of figures, on a machine with one NVIDIA GPU and no
network. Made for that machine's Python 3.12 (torch 2.11, transformers 5.17) plus the pack
(`python -m loadgen.gpu.pack`), whose wheels it installs into a private folder first; if they
don't install, it stops there with pip's log in the JSON (exit 3).

    python -m loadgen.gpu.check --pack .gpu-pack --out $OUT/gpu_check.json [--budget-s 400]

In order, each part gated on the time left of `--budget-s` (tiny.en first, large probes last):
 1. what ran: flags, commit, GPU, driver, CPU, the versions actually imported, pack wheels used;
 2. the GPU tests (`tests/gpu`) in a child pytest: per-test outcomes as they finish; a timeout
    or a missing summary is a failure;
 3. tiny.en's engine figures per dtype: encoder ms per window, decoder ms per step at
    1/8/32/64 active (the continuous engine's step);
 4. the leaderboard-style row (in-process generate, bf16, batch 64, features on the device);
 5. the sweep: a server per configuration (engine x dtype [x --compile]), levels of ~10 s at
    concurrency 1/8/32/64, configurations interleaved; GPU utilization/memory, server CPU %;
 6. agreement of every configuration's transcripts with the CPU's float32 transcripts of the
    same dequantized weights (made at pack time), and WER (Whisper-normalized);
 7. random-weight large-v3-turbo and large-v3 probes, and --max-active per card against the
    settings in deploy/ (docker-compose reads the same files).
Every row is written as soon as it is measured; an exception is recorded in its row and the
rest goes on; any failure gives exit 1. Without CUDA (and without --device cpu) it writes
{"status": "skipped"} and exits 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadgen.gpu.results import Results

ROOT = Path(__file__).resolve().parents[2]
SITE_ENV = "WHISPER_GRPC_GPU_SITE"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
        return lambda value: [kind(v) for v in value.split(",") if v]

    p = argparse.ArgumentParser(
        prog="loadgen.gpu.check", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--pack", type=Path, default=ROOT / ".gpu-pack")
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    p.add_argument("--budget-s", type=float, default=400.0, help="start no new part after this")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a dry run")
    p.add_argument("--levels", type=csv(int), default=[1, 8, 32, 64])
    p.add_argument("--level-s", type=float, default=10.0, help="load time per level")
    p.add_argument("--engines", type=csv(str), default=["continuous", "generate"])
    p.add_argument("--dtypes", type=csv(str), default=["float16", "bfloat16"])
    p.add_argument(
        "--compile",
        type=csv(str),
        default=["off", "on"],
        help="values of the server's --compile (skipped if it has none)",
    )
    p.add_argument("--probes", type=csv(str), default=["large-v3-turbo", "large-v3"])
    p.add_argument("--probe-dtype", default="float16", help="of the random-weight probes")
    p.add_argument("--leaderboard-dtype", default="bfloat16", help="the leaderboard's: bf16")
    p.add_argument("--files", type=int, default=0, help="use only the first N files (0: all)")
    p.add_argument("--tests-share", type=float, default=0.3, help="of the budget, at most")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument(
        "--wheels",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="install the pack's wheels first (--no-wheels: use what is installed)",
    )
    return p.parse_args(argv)


def install_wheels(pack: Path, results: Results) -> str | None:
    """pip-install the pack's wheels into a private folder; its path, or None on failure (the
    failure and pip's log are in the results)."""
    wheels = sorted((pack / "wheels").glob("*.whl"))
    if not wheels:
        results.fail(f"no wheels in {pack / 'wheels'} (made with --no-wheels?)")
        return None
    site = tempfile.mkdtemp(prefix="gpu-check-site-")
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        site,
        *map(str, wheels),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        results.set(
            "pip",
            {
                "command": command,
                "exit_code": done.returncode,
                "log": (done.stdout + done.stderr)[-6000:],
            },
        )
        results.fail("the pack's wheels did not install: see pip.log")
        return None
    return site


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = float(os.environ.get("WHISPER_GRPC_GPU_STARTED", time.monotonic()))
    site = os.environ.get(SITE_ENV)
    if args.wheels and not site:
        results = Results(args.out, started)
        results.set("flags", vars(args))
        if not (args.pack / "model").is_dir():
            results.fail(f"no pack at {args.pack}: run `python -m loadgen.gpu.pack` first")
            return results.finish()
        site = install_wheels(args.pack, results)
        if site is None:
            results.finish()
            return 3
        # A fresh interpreter, so every import below comes from the pack's wheels first.
        env = {
            **os.environ,
            SITE_ENV: site,
            "WHISPER_GRPC_GPU_STARTED": str(started),
            "PYTHONPATH": os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")])),
        }
        return subprocess.run(
            [sys.executable, "-m", "loadgen.gpu.check", *argv], cwd=ROOT, env=env
        ).returncode
    from loadgen.gpu.run import Check

    return Check(args, Results(args.out, started), site).run()


if __name__ == "__main__":
    sys.exit(main())
