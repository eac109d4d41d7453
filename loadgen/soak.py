"""`python -m loadgen soak` (a benchmark, not a timed test): N minutes of mixed unary calls and
real-time streams against a real server, printing the server's RSS at intervals (each minute
by default), errors by status code and p50/p99 latency per kind; at the end the RSS series and
a verdict: growth from the first sample after `--warmup-minutes` (model loading, allocator
and cache growth are start-up, not a leak) to the last, against `--max-growth-pct`, and zero
errors.

    python -m loadgen soak --minutes 30                       # starts tiny.en on loopback
    python -m loadgen soak --target HOST:PORT --pid PID ...   # a server you started

Without --target it starts `python -m server` on a free loopback port (`loadgen.spawn`) with
`--server-args` and stops it at the end. Exit status 1 when the verdict fails.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from asr.v1 import asr_pb2, asr_pb2_grpc
from loadgen.dataset import DEFAULT_DATASET, Clip, load_clips
from loadgen.live import PacedChunks, chunk
from loadgen.stats import percentiles

CHUNK_S = 0.1


class Tally:
    """Latencies and status codes per kind, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)
        self.codes: collections.Counter[tuple[str, str]] = collections.Counter()

    def add(self, kind: str, code: str, latency_s: float) -> None:
        with self.lock:
            self.codes[(kind, code)] += 1
            if code == "OK":
                self.latencies[kind].append(latency_s)

    @property
    def errors(self) -> int:
        with self.lock:
            return sum(n for (_, code), n in self.codes.items() if code != "OK")

    def line(self) -> str:
        with self.lock:
            parts = []
            for kind, values in sorted(self.latencies.items()):
                if values:
                    p50, p99 = (v * 1000 for v in percentiles(values, [50, 99]))
                    parts.append(f"{kind} n={len(values)} p50={p50:.0f}ms p99={p99:.0f}ms")
            errors = {f"{k}/{c}": n for (k, c), n in self.codes.items() if c != "OK"}
            return "; ".join(parts) + f"; errors {errors or 0}"


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


@dataclass(frozen=True)
class Verdict:
    baseline_mib: float
    """RSS at the first sample at or after the warm-up."""
    last_mib: float
    growth_pct: float
    max_growth_pct: float
    errors: int

    @property
    def ok(self) -> bool:
        return self.errors == 0 and not self.growth_pct > self.max_growth_pct

    def line(self) -> str:
        word = "PASS" if self.ok else "FAIL"
        return (f"verdict: {word}: RSS {self.baseline_mib:.0f} -> {self.last_mib:.0f} MiB after "
                f"the warm-up ({self.growth_pct:+.1f} %, target <= {self.max_growth_pct:g} %), "
                f"{self.errors} error(s)")  # fmt: skip


def verdict(
    series: Sequence[tuple[float, float]], warmup_s: float, max_growth_pct: float, errors: int
) -> Verdict:
    """Growth from the first (elapsed s, MiB) sample at or after `warmup_s` to the last; NaN
    (no verdict on memory) when the run ended before the warm-up did."""
    after = [mib for t, mib in series if t >= warmup_s]
    if not after:
        nan = float("nan")
        return Verdict(nan, series[-1][1] if series else nan, nan, max_growth_pct, errors)
    return Verdict(after[0], after[-1], (after[-1] / after[0] - 1) * 100, max_growth_pct, errors)


def unary_client(
    stub: Any, clips: list[Clip], tally: Tally, stop: threading.Event, md: Any
) -> None:
    i = 0
    while not stop.is_set():
        content = clips[i % len(clips)].content
        i += 1
        started = time.perf_counter()
        try:
            request = asr_pb2.RecognizeRequest(audio=asr_pb2.RecognitionAudio(content=content))
            stub.Recognize(request, timeout=120, metadata=md)
            tally.add("unary", "OK", time.perf_counter() - started)
        except grpc.RpcError as err:
            tally.add("unary", err.code().name, time.perf_counter() - started)


def stream_client(
    stub: Any, clips: list[Clip], tally: Tally, stop: threading.Event, md: Any
) -> None:
    """One utterance per stream, sent in real time (100 ms chunks at their pace)."""
    config = asr_pb2.StreamingRecognitionConfig(
        config=asr_pb2.RecognitionConfig(
            encoding=asr_pb2.RecognitionConfig.LINEAR16, sample_rate_hertz=16_000
        ),
        interim_results=True,
    )
    i = 0
    while not stop.is_set():
        paced = PacedChunks(chunk(clips[i % len(clips)].pcm16(), 16_000, CHUNK_S), CHUNK_S)
        i += 1

        def messages(paced: PacedChunks = paced) -> Any:
            yield asr_pb2.StreamingRecognizeRequest(streaming_config=config)
            for piece in paced:
                yield asr_pb2.StreamingRecognizeRequest(audio_content=piece)

        try:
            for _ in stub.StreamingRecognize(messages(), timeout=300, metadata=md):
                pass
            tally.add("stream_final", "OK", paced.clock() - paced.sent[-1])
        except grpc.RpcError as err:
            tally.add("stream", err.code().name, 0.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadgen soak", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="data set spec [sample]")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup-minutes", type=float, default=5.0,
                        help="RSS growth counts from the first sample after this [5]")  # fmt: skip
    parser.add_argument("--max-growth-pct", type=float, default=5.0,
                        help="the verdict's RSS growth target after warm-up, %% [5]")  # fmt: skip
    parser.add_argument("--unary", type=int, default=2, help="closed-loop unary clients [2]")
    parser.add_argument("--streams", type=int, default=2, help="real-time streams at once [2]")
    parser.add_argument("--interval-s", type=float, default=60.0, help="report every ... s [60]")
    parser.add_argument("--limit", type=int, default=40, help="audio files to replay [40]")
    parser.add_argument("--target", help="HOST:PORT of a running server (else one is started)")
    parser.add_argument("--pid", type=int, help="its process id, for RSS")
    parser.add_argument("--token-file", type=Path, help="bearer token file")
    parser.add_argument("--server-args", default="--model tiny.en",
                        help="flags of the server started here [--model tiny.en]")  # fmt: skip
    parser.add_argument("--out", type=Path, help="folder for the started server's log")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    clips = load_clips(args.dataset, files=args.limit)
    server = None
    target, pid = args.target, args.pid
    if target is None:
        from loadgen.spawn import start_server

        log_path = args.out / "server.log" if args.out else None
        server = start_server(shlex.split(args.server_args), log_path=log_path)
        target, pid = server.address, server.process.pid
    try:
        return soak(args, clips, target, pid)
    finally:
        if server is not None:
            server.stop()


def soak(args: argparse.Namespace, clips: list[Clip], target: str, pid: int | None) -> int:
    metadata = None
    if args.token_file:
        token = next(t for t in args.token_file.read_text().splitlines() if t.strip()
                     and not t.lstrip().startswith("#")).split()[0]  # fmt: skip
        metadata = [("authorization", f"Bearer {token}")]
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
    stub = asr_pb2_grpc.SpeechStub(channel)
    tally, stop = Tally(), threading.Event()
    threads = [
        threading.Thread(target=fn, args=(stub, clips, tally, stop, metadata), daemon=True)
        for fn, count in ((unary_client, args.unary), (stream_client, args.streams))
        for _ in range(count)
    ]
    for t in threads:
        t.start()
    started = time.monotonic()
    series: list[tuple[float, float]] = []
    try:
        while (elapsed := time.monotonic() - started) < args.minutes * 60:
            stop.wait(min(args.interval_s, args.minutes * 60 - elapsed))
            elapsed = time.monotonic() - started
            series.append((elapsed, rss_mib(pid) if pid else float("nan")))
            print(f"[{elapsed:7.0f} s] rss={series[-1][1]:.0f} MiB; {tally.line()}", flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(300)
        channel.close()
    print("rss series (s, MiB): " + ", ".join(f"{t:.0f}:{m:.0f}" for t, m in series))
    result = verdict(series, args.warmup_minutes * 60, args.max_growth_pct, tally.errors)
    print(f"summary: {args.minutes:g} min, unary {args.unary}, streams {args.streams}; "
          f"{tally.line()}")  # fmt: skip
    print(result.line())
    return 0 if result.ok else 1


if __name__ == "__main__":
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    sys.exit(main())
