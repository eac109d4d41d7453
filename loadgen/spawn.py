"""The one helper that starts a Speech server as a subprocess (`python -m server`) on loopback
and waits until its health check says SERVING; `make loadtest`, `loadgen run --spawn-server`
and `loadgen soak` use it.

The server is told a free port picked here (so nothing parses its log), and the wait is a
health `Watch` with wait-for-ready: it returns when the status turns SERVING, and fails at once
with the log's last lines when the process exits first, instead of waiting out the timeout.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadgen.errors import LoadgenError

log = logging.getLogger(__name__)
WATCH_SLICE_S = 2.0
"""Longest single health wait: between two, whether the process still lives is checked."""


class ServerStartError(LoadgenError):
    """The server exited, or did not say SERVING in time."""

    exit_code = 1


@dataclass
class SpawnedServer:
    process: subprocess.Popen[bytes]
    address: str
    log_path: Path | None

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (the server drains), then SIGKILL if it outlives `timeout_s`."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_server(
    server_args: Sequence[str] = (),
    *,
    log_path: Path | None = None,
    timeout_s: float = 600.0,
    python: str = sys.executable,
) -> SpawnedServer:
    """`python -m server` on 127.0.0.1 (a free port, no metrics port) with `server_args`
    (e.g. `--model tiny.en`), its stderr into `log_path` (else inherited); SERVING on return."""
    port = free_port()
    command = [python, "-m", "server", "--host", "127.0.0.1", "--port", str(port),
               "--metrics-port", "-1", *server_args]  # fmt: skip
    stderr: IO[bytes] | None = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        stderr = log_path.open("wb")
    try:
        process = subprocess.Popen(command, stderr=stderr)
    finally:
        if stderr is not None:
            stderr.close()  # the child holds its own descriptor
    server = SpawnedServer(process, f"127.0.0.1:{port}", log_path)
    log.info("started the server (pid %d) on %s: %s", process.pid, server.address, command)
    try:
        wait_serving(server, timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def wait_serving(server: SpawnedServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if server.process.poll() is not None:
                raise ServerStartError(
                    f"the server exited ({server.process.returncode}) before SERVING"
                    + _log_tail(server.log_path)
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerStartError(f"the server did not say SERVING within {timeout_s:g} s")
            try:
                watch = stub.Watch(
                    health_pb2.HealthCheckRequest(),
                    timeout=min(remaining, WATCH_SLICE_S),
                    wait_for_ready=True,
                )
                for response in watch:
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError:
                continue  # not listening yet, or not SERVING within this slice


def _log_tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.is_file():
        return ""
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    return f"; the end of {path}:\n" + "\n".join(tail)


@contextlib.contextmanager
def running_server(server_args: Sequence[str] = (), **kwargs: object) -> Iterator[SpawnedServer]:
    server = start_server(server_args, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
