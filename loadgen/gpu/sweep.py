"""The server on the GPU, configuration against configuration: one real server process per
configuration (engine x dtype x compiled decode step), all started at once, then levels of
closed-loop load bounded by time, the configurations interleaved within each level so that
drift of the machine falls on all of them alike. Per level: throughput, latency percentiles,
errors by status code, the GPU's utilization and memory (NVML, else torch.cuda) and the
server process's CPU %. Only the check's main thread drives this."""

from __future__ import annotations

import contextlib
import itertools
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgen.stats import percentiles

ROOT = Path(__file__).resolve().parents[2]
START_LIMIT_S = 180.0


@dataclass
class Config:
    engine: str
    dtype: str
    compile: str | None = None  # None: the server has no --compile flag

    @property
    def name(self) -> str:
        extra = f", compile {self.compile}" if self.compile else ""
        return f"{self.engine} {self.dtype}{extra}"


def server_flags() -> str:
    """`python -m server --help`, to see which flags this server accepts."""
    done = subprocess.run(
        [sys.executable, "-m", "server", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout


def configurations(
    engines: list[str], dtypes: list[str], compiles: list[str]
) -> tuple[list[Config], str | None]:
    """Every combination; the compile dimension only where the server takes --compile."""
    note = None
    if compiles and "--compile" not in server_flags():
        note = "the server has no --compile flag: the decode step ran as it does by default"
        compiles = []
    variants: list[str | None] = [*compiles] or [None]
    return [Config(e, d, c) for e, d, c in itertools.product(engines, dtypes, variants)], note


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    config: Config
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    channel: Any = None
    error: str | None = None

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2500:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(config: Config, checkpoint: Path, device: str, most: int) -> Server:
    """A server for `config`, batches and slots of up to `most` windows."""
    port = _free_port()
    log = Path(tempfile.mkdtemp()) / "server.log"
    command = [
        sys.executable,
        "-m",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "-1",
        "--model",
        str(checkpoint),
        "--device",
        device,
        "--dtype",
        config.dtype,
        "--engine",
        config.engine,
        "--max-batch-size",
        str(most),
        "--max-active",
        str(most),
        "--max-queue-size",
        "1024",
        "--warmup",
        "true",
        "--log-level",
        "WARNING",
    ]
    if config.compile:
        command += ["--compile", config.compile]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    return Server(config, process, port, log)


def wait_serving(server: Server, limit_s: float = START_LIMIT_S) -> None:
    """Until the health service says SERVING (a watch: no polling), or the process ends."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    health = health_pb2_grpc.HealthStub(server.channel)
    try:
        for reply in health.Watch(
            health_pb2.HealthCheckRequest(), timeout=limit_s, wait_for_ready=True
        ):
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else e
        exit_code = server.process.poll()
        server.error = f"not SERVING ({code}; exit {exit_code}): {server.log_tail()}"
        return
    server.error = f"health watch ended without SERVING: {server.log_tail()}"


class Sampler:
    """The GPU's utilization and memory and one process's CPU %, every `every_s`, on a thread
    (NVML where nvidia-ml-py is installed, else torch.cuda's device-wide figures)."""

    def __init__(self, pid: int, cuda: bool, every_s: float = 0.2) -> None:
        self.pid, self.cuda, self.every_s = pid, cuda, every_s
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.source = "none"

    def __enter__(self) -> Sampler:
        import psutil

        self._proc = psutil.Process(self.pid)
        self._cpu0 = self._proc.cpu_times()
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        times = self._proc.cpu_times()
        self.cpu_percent = (
            100
            * (times.user + times.system - self._cpu0.user - self._cpu0.system)
            / max(1e-9, time.monotonic() - self._t0)
        )

    def _read(self) -> Any:
        if not self.cuda:
            return lambda: {}
        with contextlib.suppress(Exception):
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.source = "nvml"

            def nvml() -> dict[str, float]:
                used = {
                    p.pid: (p.usedGpuMemory or 0)
                    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                }
                return {
                    "util": float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                    "used_mib": pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20,
                    "process_mib": used.get(self.pid, 0) / 2**20,
                }

            return nvml
        import torch

        self.source = "torch.cuda"

        def torch_cuda() -> dict[str, float]:
            free, total = torch.cuda.mem_get_info()
            out = {"used_mib": (total - free) / 2**20}
            with contextlib.suppress(Exception):
                out["util"] = float(torch.cuda.utilization())
            return out

        return torch_cuda

    def _run(self) -> None:
        read = self._read()
        while not self._stop.wait(self.every_s):
            with contextlib.suppress(Exception):
                self.samples.append(read())

    def summary(self) -> dict[str, Any]:
        def stat(key: str, how: Any) -> float | None:
            values = [s[key] for s in self.samples if key in s]
            return round(how(values), 1) if values else None

        return {
            "server_cpu_percent": round(self.cpu_percent, 1),
            "gpu_util_mean": stat("util", lambda v: sum(v) / len(v)),
            "gpu_util_max": stat("util", max),
            "gpu_used_mib_max": stat("used_mib", max),
            "server_gpu_mib_max": stat("process_mib", max),
            "gpu_samples": len(self.samples),
            "gpu_source": self.source,
        }


@dataclass
class Level:
    latencies_s: list[float] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    codes: Counter[str] = field(default_factory=Counter)
    audio_s: float = 0.0
    wall_s: float = 0.0


def closed_loop(channel: Any, items: list[Any], concurrency: int, duration_s: float) -> Level:
    """`concurrency` clients, each sending the next file as soon as its last one returns, until
    `duration_s` has passed; the requests in flight then finish and count."""
    import grpc

    from asr.v1 import asr_pb2, asr_pb2_grpc

    stub = asr_pb2_grpc.SpeechStub(channel)
    level, lock, order = Level(), threading.Lock(), itertools.count()
    started = time.monotonic()
    end = started + duration_s

    def client() -> None:
        while time.monotonic() < end:
            item = items[next(order) % len(items)]
            request = asr_pb2.RecognizeRequest(audio=asr_pb2.RecognitionAudio(content=item.data))
            sent = time.perf_counter()
            try:
                response = stub.Recognize(request, timeout=120)
            except grpc.RpcError as e:
                with lock:
                    level.codes[str(e.code().name if e.code() else "UNKNOWN")] += 1
                continue
            text = " ".join(
                r.alternatives[0].transcript for r in response.results if r.alternatives
            )
            with lock:
                level.latencies_s.append(time.perf_counter() - sent)
                level.codes["OK"] += 1
                level.audio_s += item.audio_s
                level.texts.setdefault(item.id, text)

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    level.wall_s = time.monotonic() - started
    return level


def level_row(config: Config, concurrency: int, level: Level) -> dict[str, Any]:
    p50, p90, p99 = percentiles(level.latencies_s, [50, 90, 99])
    n = len(level.latencies_s)
    return {
        "config": config.name,
        "engine": config.engine,
        "dtype": config.dtype,
        "compile": config.compile,
        "concurrency": concurrency,
        "requests": n,
        "codes": dict(level.codes),
        "wall_s": round(level.wall_s, 2),
        "files_per_s": round(n / level.wall_s, 2) if level.wall_s else None,
        "rtfx": round(level.audio_s / level.wall_s, 1) if level.wall_s else None,
        "p50_ms": round(p50 * 1000, 1) if n else None,
        "p90_ms": round(p90 * 1000, 1) if n else None,
        "p99_ms": round(p99 * 1000, 1) if n else None,
    }


def level_seconds(wanted_s: float, available_s: float, levels: int, floor_s: float = 4.0) -> float:
    """Load time per level so that `levels` levels (each ~2 s more: requests in flight finish,
    samplers stop) fit in `available_s`; never under `floor_s` (the later levels are then
    skipped as out of time, and say so)."""
    if levels <= 0:
        return wanted_s
    return max(min(floor_s, wanted_s), min(wanted_s, available_s / levels - 2.0))


def rotate(configs: list[Any], by: int) -> list[Any]:
    """The order for one level: each level starts with the next configuration."""
    by %= max(1, len(configs))
    return configs[by:] + configs[:by]
