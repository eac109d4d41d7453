"""Soak test (a benchmark, not a timed test): N minutes of mixed unary calls and real-time
streams against a real server, printing the server's RSS at intervals, errors by status code,
and p50/p99 latency per kind; a summary at the end (RSS growth from the first sample after
warm-up, so model loading doesn't count).

    python scripts/soak.py --dataset ../shared/data/LibriSpeech/test-clean --minutes 30
    python scripts/soak.py --target HOST:PORT --pid PID ...     # a server you started

Without --target it starts `python -m server` on a free loopback port with --model and stops
it at the end. Goal (README): RSS growth < 10 %, zero errors.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr.v1 import asr_pb2, asr_pb2_grpc

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

    def line(self) -> str:
        with self.lock:
            parts = []
            for kind, values in sorted(self.latencies.items()):
                if values:
                    p50, p99 = np.percentile(values, [50, 99]) * 1000
                    parts.append(f"{kind} n={len(values)} p50={p50:.0f}ms p99={p99:.0f}ms")
            errors = {f"{k}/{c}": n for (k, c), n in self.codes.items() if c != "OK"}
            return "; ".join(parts) + f"; errors {errors or 0}"


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


def load_audio(folder: Path, limit: int) -> list[tuple[bytes, np.ndarray]]:
    """(file bytes, 16 kHz int16 PCM) of up to `limit` files."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".flac", ".wav"))
    out = []
    for path in files[:limit]:
        data, rate = sf.read(path, dtype="int16", always_2d=True)
        if rate == 16_000:
            out.append((path.read_bytes(), data[:, 0].copy()))
    if not out:
        raise SystemExit(f"no 16 kHz FLAC/WAV files in {folder}")
    return out


def unary_client(stub, audio, tally: Tally, stop: threading.Event, metadata) -> None:
    i = 0
    while not stop.is_set():
        content = audio[i % len(audio)][0]
        i += 1
        started = time.perf_counter()
        try:
            request = asr_pb2.RecognizeRequest(audio=asr_pb2.RecognitionAudio(content=content))
            stub.Recognize(request, timeout=120, metadata=metadata)
            tally.add("unary", "OK", time.perf_counter() - started)
        except grpc.RpcError as err:
            tally.add("unary", err.code().name, time.perf_counter() - started)


def stream_client(stub, audio, tally: Tally, stop: threading.Event, metadata) -> None:
    """One utterance per stream, sent in real time (100 ms chunks at their pace)."""
    i = 0
    while not stop.is_set():
        pcm = audio[i % len(audio)][1]
        i += 1
        sent_at: list[float] = []

        def messages(pcm=pcm, sent_at=sent_at):
            config = asr_pb2.RecognitionConfig(
                encoding=asr_pb2.RecognitionConfig.LINEAR16, sample_rate_hertz=16_000
            )
            yield asr_pb2.StreamingRecognizeRequest(
                streaming_config=asr_pb2.StreamingRecognitionConfig(
                    config=config, interim_results=True
                )
            )
            step = int(16_000 * CHUNK_S)
            start = time.perf_counter()
            for n, offset in enumerate(range(0, len(pcm), step)):
                delay = start + n * CHUNK_S - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)  # real time: the client's pace, not a wait for state
                yield asr_pb2.StreamingRecognizeRequest(
                    audio_content=pcm[offset : offset + step].tobytes()
                )
            sent_at.append(time.perf_counter())

        try:
            for _ in stub.StreamingRecognize(messages(), timeout=300, metadata=metadata):
                pass
            tally.add("stream_final", "OK", time.perf_counter() - sent_at[-1])
        except grpc.RpcError as err:
            tally.add("stream", err.code().name, 0.0)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    command = [
        sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0",
        "--metrics-port", "-1", "--model", args.model, *args.server_arg,
    ]  # fmt: skip
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        match = re.search(r"listening on [\d.]+:(\d+)", line)
        if match:
            threading.Thread(target=_drain, args=(proc,), daemon=True).start()
            return proc, f"127.0.0.1:{match.group(1)}"
    raise SystemExit("the server exited before listening")


def _drain(proc: subprocess.Popen[str]) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        if "WARNING" in line or "ERROR" in line:
            sys.stderr.write(line)


def wait_serving(channel: grpc.Channel, timeout_s: float) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(1)  # start-up polling
    raise SystemExit("the server did not report SERVING")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, required=True, help="folder of 16 kHz FLAC/WAV")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--unary", type=int, default=2, help="closed-loop unary clients")
    parser.add_argument("--streams", type=int, default=2, help="real-time streams at once")
    parser.add_argument("--interval-s", type=float, default=30.0, help="report every ...")
    parser.add_argument("--limit", type=int, default=40, help="audio files to replay")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--target", help="HOST:PORT of a running server (else one is started)")
    parser.add_argument("--pid", type=int, help="its process id, for RSS")
    parser.add_argument("--token-file", type=Path, help="bearer token file")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra flag for the started server"
    )
    args = parser.parse_args()
    audio = load_audio(args.dataset, args.limit)
    proc = None
    target, pid = args.target, args.pid
    if target is None:
        proc, target = start_server(args)
        pid = proc.pid
    metadata = None
    if args.token_file:
        metadata = [("authorization", f"Bearer {args.token_file.read_text().split()[0]}")]
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * 2**20)])
    wait_serving(channel, 600)
    stub = asr_pb2_grpc.SpeechStub(channel)
    tally, stop = Tally(), threading.Event()
    clients = [(unary_client, args.unary), (stream_client, args.streams)]
    threads = [
        threading.Thread(target=fn, args=(stub, audio, tally, stop, metadata), daemon=True)
        for fn, count in clients
        for _ in range(count)
    ]
    for t in threads:
        t.start()
    started = time.monotonic()
    first_rss = None
    try:
        while (elapsed := time.monotonic() - started) < args.minutes * 60:
            stop.wait(min(args.interval_s, args.minutes * 60 - elapsed))
            rss = rss_mb(pid) if pid else float("nan")
            first_rss = first_rss or rss
            print(f"[{time.monotonic() - started:7.0f} s] rss={rss:.0f} MiB; {tally.line()}")
            sys.stdout.flush()
    finally:
        stop.set()
        for t in threads:
            t.join(300)
        last_rss = rss_mb(pid) if pid else float("nan")
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    growth = (last_rss / first_rss - 1) * 100 if first_rss else float("nan")
    load = f"{args.minutes:g} min, unary {args.unary}, streams {args.streams}"
    memory = f"rss {first_rss:.0f} -> {last_rss:.0f} MiB ({growth:+.1f} %)"
    print(f"summary: {load}; {memory}; {tally.line()}")
    errors = sum(n for (_, code), n in tally.codes.items() if code != "OK")
    return 1 if errors else 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    sys.exit(main())
