"""The server as a process: `python -m server` starts NOT_SERVING, loads, reports SERVING, and on
SIGTERM finishes queued work, refuses new work and exits 0 within seconds of the last response,
even with a health Watch open (the grace period bounds the work, not idle streams)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr.v1 import asr_pb2, asr_pb2_grpc
from tests.conftest import JFK_WAV, require_data

ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 60
EXIT_WITHIN_S = 10  # after the last response; before the fix, the open Watch held the grace


class ServerProcess:
    """`python -m server` on port 0; ports are read from its log lines."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0", *args],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()
        with self._seen:
            self.lines.append("<eof>")
            self._seen.notify_all()

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match[str]:
        with self._seen:
            found: list[re.Match[str]] = []

            def match() -> bool:
                for line in self.lines:
                    m = re.search(pattern, line)
                    if m:
                        found.append(m)
                        return True
                return "<eof>" in self.lines

            assert self._seen.wait_for(match, timeout), f"no {pattern!r} in {self.lines}"
            assert found, f"server exited before {pattern!r}: {''.join(self.lines)}"
            return found[0]


def queue_depth(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    m = re.search(rb"^asr_queue_depth (\S+)$", text, re.M)
    return float(m.group(1)) if m else -1.0


@pytest.mark.timeout(600)
def test_sigterm_drains_queued_work_and_exits_zero(tiny_checkpoint):
    require_data()
    server = ServerProcess(
        "--model", str(tiny_checkpoint), "--metrics-port", "0", "--warmup", "false",
        "--engine", "generate", "--max-batch-size", "8", "--max-wait-ms", "10000",
        "--grace-s", str(GRACE_S),
    )  # fmt: skip
    # The generate engine with a 10 s batch window holds requests in its queue, so SIGTERM
    # surely finds work queued (the continuous engine's drain is tested in test_continuous).
    try:
        port = int(server.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        metrics_port = int(server.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)").group(1))
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        # Watch streams every status change: the first is NOT_SERVING or SERVING, then SERVING.
        statuses = health.Watch(health_pb2.HealthCheckRequest(service="asr.v1.Speech"))
        for reply in statuses:
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
        stub = asr_pb2_grpc.SpeechStub(channel)
        request = asr_pb2.RecognizeRequest(
            audio=asr_pb2.RecognitionAudio(content=JFK_WAV.read_bytes())
        )
        pending = [stub.Recognize.future(request, timeout=300) for _ in range(3)]
        # With a 10 s batch window and room for 8, the three requests wait in the queue.
        while queue_depth(metrics_port) < 3:
            assert not any(p.done() for p in pending), [p.exception() for p in pending if p.done()]
        server.proc.send_signal(signal.SIGTERM)
        for reply in statuses:  # health flips before anything else happens
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            break
        with pytest.raises(grpc.RpcError) as refused:  # a new call after SIGTERM: refused
            stub.Recognize(request, timeout=60)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (refused.value.details() or "")
        texts = [p.result().results[0].alternatives[0].transcript for p in pending]
        finished = time.monotonic()
        assert all("country" in t for t in texts)
        # The Watch is still open: it ends with its last status, and the process exits 0 within
        # seconds of the last response, far inside the grace period.
        assert [r.status for r in statuses] == []
        assert server.proc.wait(EXIT_WITHIN_S) == 0
        assert time.monotonic() - finished < EXIT_WITHIN_S
    finally:
        if server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGKILL)
