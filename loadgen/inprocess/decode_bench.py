"""Eager against compiled decode steps, side by side: `python -m loadgen decode`.

Two servers in this process over the same loaded weights, one with `--compile off` and one
with `--compile on` (inductor on a CPU, CUDA graphs on a GPU), measured in turns (eager, then
compiled, at each concurrency, for each round), so a busy or throttling machine hurts both
alike. For each it reports files/s and p50/p99 latency at each concurrency (N client threads,
each sending its next file when the last returns), WER against the references, and the
server's own decode step time at one active sequence and at 5-8 (read from its per-step
histogram, `asr_decode_step_seconds`), with the CPU model and the load average before and
after. It also counts the files whose transcript differs between the two (in fp32 both should
agree; a difference is a near-tie flipped by a different float summation order).

    python -m loadgen decode --dataset DIR [--limit 100] [--concurrency 1,8]
        [--model tiny.en] [--dtype float32] [--max-active 8] [--rounds 1]
    python -m loadgen decode --steps [--concurrency 1,8] [--model tiny.en]

`--steps` times the decode step alone, in process (no gRPC, no encoder): `GreedyRuntime.step`
eager and compiled, at each number of active sequences, in turns, over `--rounds` rounds.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgen.dataset import Item, load_dataset

log = logging.getLogger(__name__)
MODES = ("off", "on")  # eager, compiled


@dataclass
class Run:
    """One measured pass of every file through one server at one concurrency."""

    mode: str
    concurrency: int
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    step_ms: dict[int, float] = field(default_factory=dict)  # rows bucket -> mean step ms

    @property
    def files_per_s(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run_clients(call: Callable[[Item], str], items: Sequence[Item], concurrency: int, run: Run):
    """`concurrency` threads, each sending the next file when its last one returned."""
    lock = threading.Lock()
    cursor = iter(range(len(items)))

    def client() -> None:
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            started = time.perf_counter()
            text = call(items[i])
            with lock:
                run.latencies.append(time.perf_counter() - started)
                run.texts[items[i].id] = text

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    run.wall_s = time.perf_counter() - started


def step_means(before: dict[int, Any], after: dict[int, Any]) -> dict[int, float]:
    """Mean step ms per rows bucket between two `StepTimes.snapshot()`s."""
    means = {}
    for rows, h in after.items():
        old = before.get(rows)
        steps = h.steps - (old.steps if old else 0)
        if steps:
            means[rows] = 1000 * (h.sum_s - (old.sum_s if old else 0.0)) / steps
    return means


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    return "unknown CPU"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--dataset", help="LibriSpeech split folder (test-other)")
    p.add_argument("--steps", action="store_true", help="time the decode step alone")
    p.add_argument("--tokens", type=int, default=64, help="--steps: steps timed per turn")
    p.add_argument("--limit", type=int, default=100, help="files (seeded sample), default 100")
    p.add_argument("--concurrency", default="1,8", help="comma-separated levels, default 1,8")
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--dtype", default="float32", help="float32 (default: tokens comparable)")
    p.add_argument("--max-active", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1, help="interleaved repetitions")
    p.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: server's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from asr.v1 import asr_pb2
    from loadgen.wer import word_error_rate
    from server.config import Settings
    from server.embedded import EmbeddedServer
    from server.models.loader import load_model

    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.steps:
        print("\n".join(time_steps(args, levels)))
        return 0
    if not args.dataset:
        _parser().error("--dataset is required (or --steps)")
    data = load_dataset(args.dataset, limit=args.limit)
    base = Settings(model=args.model, dtype=args.dtype, max_active=args.max_active,
                    max_batch_size=min(8, args.max_active), max_queue_size=512)  # fmt: skip
    if args.cache_dir is not None:
        base = base.replace(cache_dir=args.cache_dir)
    load_before = load_average()
    model = load_model(base.replace(compile="on", warmup=False))  # inductor's cache location
    servers, start_s = {}, {}
    for mode in MODES:
        started = time.perf_counter()
        servers[mode] = EmbeddedServer(base.replace(compile=mode), model).start()
        start_s[mode] = time.perf_counter() - started
    try:
        runs: list[Run] = []
        for _ in range(args.rounds):
            for level in levels:
                for mode in MODES:
                    runs.append(_measure(servers[mode], mode, level, data.items, asr_pb2))
    finally:
        for server in servers.values():
            server.stop()
    header = [
        f"- CPU: {cpu_model()}; model {args.model}, {args.dtype}, max_active {args.max_active}",
        f"- load average before: {load_before}; after: {load_average()}",
        f"- start-up incl. warm-up: eager {start_s['off']:.1f} s, compiled {start_s['on']:.1f} s",
    ]
    title = f"## Decode step: eager vs {_engine(servers['on']).decode_step}"
    print("\n".join(report(title, header, runs, levels, data.references, word_error_rate)))
    return 0


def _measure(server: Any, mode: str, level: int, items: Sequence[Item], pb: Any) -> Run:
    stub = server.stub()
    times = _engine(server).step_times

    def call(item: Item) -> str:
        request = pb.RecognizeRequest(audio=pb.RecognitionAudio(content=item.data))
        response = stub.Recognize(request, timeout=600)
        return " ".join(r.alternatives[0].transcript for r in response.results if r.alternatives)

    run = Run(mode, level)
    before = times.snapshot()
    run_clients(call, items, level, run)
    run.step_ms = step_means(before, times.snapshot())
    log.info("%s c%d: %.2f files/s", mode, level, run.files_per_s)
    return run


def time_steps(args: argparse.Namespace, levels: list[int]) -> list[str]:
    """Mean ms of `GreedyRuntime.step` at each number of active sequences, eager and compiled
    in turns (one second of noise as every window; its sequences never finish)."""
    import numpy as np

    from server.config import Settings
    from server.models.base import DecodeOptions
    from server.models.loader import load_model
    from server.models.whisper_step import GreedyRuntime

    settings = Settings(model=args.model, dtype=args.dtype, compile="on", warmup=False)
    if args.cache_dir is not None:
        settings = settings.replace(cache_dir=args.cache_dir)
    model: Any = load_model(settings)
    runtimes = {}
    for mode in MODES:
        runtimes[mode] = GreedyRuntime(model, max(levels), compile=mode)
        started = time.perf_counter()
        runtimes[mode].warm_steps()
        log.info("%s: warmed in %.1f s", mode, time.perf_counter() - started)
    noise = np.random.default_rng(0).standard_normal(16_000).astype(np.float32) * 0.01
    features = model.prepare(noise)
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.rounds):
        for n in levels:
            for mode, runtime in runtimes.items():
                prompt = runtime.prompt(DecodeOptions()) or []
                seqs = runtime.join([features] * n, [prompt] * n, list(range(n)))
                for seq in seqs:  # keep all n decoding whatever they emit
                    seq.finished, seq.max_new_tokens = False, 10**6
                runtime.step()
                started = time.perf_counter()
                for _ in range(args.tokens):
                    runtime.step()
                elapsed = time.perf_counter() - started
                runtime.leave(list(runtime.active))
                times.setdefault((n, mode), []).append(1000 * elapsed / args.tokens)
    lines = [f"## Decode step alone: {args.model}, {args.dtype}, {cpu_model()}",
             f"load average after: {load_average()}", "",
             "| active | eager ms/step | compiled ms/step | speed-up |",
             "|---:|---:|---:|---:|"]  # fmt: skip
    for n in levels:
        eager, comp = min(times[(n, "off")]), min(times[(n, "on")])
        lines.append(f"| {n} | {eager:.2f} | {comp:.2f} | {eager / comp:.2f}x |")
    return lines


def _engine(server: Any) -> Any:
    """The continuous engine behind an EmbeddedServer (its step times and decode_step)."""
    return server.handle.batcher


def report(
    title: str,
    header: list[str],
    runs: list[Run],
    levels: list[int],
    refs: dict[str, str],
    wer: Callable[[list[str], list[str]], float],
) -> list[str]:
    """The Markdown report: the header lines, one table row per run, then per level the
    compiled/eager ratio and how many transcripts differ between the two."""
    lines = [title, "", *header, ""]
    lines.append("| step | conc. | files/s | p50 s | p99 s | WER % | step ms @1 | step ms @5-8 |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    ids = sorted(refs)
    for r in runs:
        w = 100 * wer([refs[i] for i in ids], [r.texts.get(i, "") for i in ids]) if ids else 0.0
        cells = [f"{r.step_ms[k]:.2f}" if k in r.step_ms else "-" for k in (1, 8)]
        name = "eager" if r.mode == "off" else "compiled"
        lines.append(f"| {name} | {r.concurrency} | {r.files_per_s:.2f} | {r.pct(0.5):.2f} | "
                     f"{r.pct(0.99):.2f} | {w:.2f} | {cells[0]} | {cells[1]} |")  # fmt: skip
    for level in levels:
        eager = [r for r in runs if r.mode == "off" and r.concurrency == level]
        comp = [r for r in runs if r.mode == "on" and r.concurrency == level]
        speedup = sum(r.files_per_s for r in comp) / max(1e-9, sum(r.files_per_s for r in eager))
        pairs = list(zip(eager, comp, strict=True))
        differ = sum(1 for e, c in pairs for k in e.texts if e.texts[k] != c.texts.get(k))
        total = sum(len(e.texts) for e, _ in pairs)
        lines.append(f"\nconcurrency {level}: compiled/eager files/s {speedup:.2f}x; "
                     f"transcripts that differ: {differ} of {total}")  # fmt: skip
    return lines


if __name__ == "__main__":
    sys.exit(main())
