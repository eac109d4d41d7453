"""The load generator against a real server (tiny.en) on loopback, with real LibriSpeech audio.

The load generator always runs as a subprocess: Locust monkey-patches its process with gevent,
which must never happen in pytest's process where the real (asyncio) server runs.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from asr.v1 import asr_pb2, asr_pb2_grpc
from server.config import Settings
from server.embedded import EmbeddedServer
from server.models.fake import FakeModel
from tests.conftest import LIBRISPEECH, ROOT, require_data

# tiny.en (greedy, fp32) gives about 4% on these files; the bound leaves room for the odd
# batch-dependent decode.
WER_BOUND = 0.15
RUN_FILES = [
    "summary.csv",
    "summary.json",
    "records.csv",
    "latency.png",
    "throughput.png",
    "cdf.png",
    "breakdown.png",
    "timeseries.png",
    "report.html",
]


def loadgen(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadgen", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_sweep_closed_and_open_loop(real_server, tmp_path: Path):
    require_data()
    out = tmp_path / "run"
    result = loadgen(
        "run",
        "--target", real_server.address,
        "--dataset", str(LIBRISPEECH / "test-clean"),
        "--concurrency", "1,4",
        "--rate", "1",
        "--duration", "4",
        "--warmup", "0",
        "--limit", "8",
        "--seed", "0",
        "--label", "cpu-test",
        "--price-per-hour", "0.10",
        "--progress-interval", "1",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    for name in RUN_FILES:
        assert (out / name).is_file(), name

    rows = read_csv(out / "summary.csv")
    assert [(r["mode"], r["concurrency"], r["rate"]) for r in rows] == [
        ("closed", "1", ""),
        ("closed", "4", ""),
        ("open", "", "1.0"),
    ]
    for row in rows:
        assert int(row["requests"]) >= 1, row
        assert int(row["errors"]) == 0 and row["errors_by_code"] == "", row
        p50, p90, p95, p99, top = (
            float(row[k]) for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")
        )
        assert 0 < p50 <= p90 <= p95 <= p99 <= top, row
        assert float(row["rps"]) > 0 and float(row["audio_s_per_s"]) > 0, row
        assert float(row["wer"]) < WER_BOUND, row
        assert float(row["queue_p50_ms"]) >= 0 and float(row["infer_p50_ms"]) > 0, row
        assert float(row["batch_size_mean"]) >= 1, row
        # The continuous engine's split: its own encoder pass and decode steps, measured.
        assert float(row["encode_p50_ms"]) > 0 and float(row["decode_p50_ms"]) > 0, row
        assert float(row["wait_p50_ms"]) >= 0 and float(row["held_p50_ms"]) >= 0, row
        assert row["measured"] == "true" and int(row["samples"]) >= 1, row

    meta = json.loads((out / "summary.json").read_text())
    assert meta["target"] == real_server.address
    assert (meta["label"], meta["price_per_hour"], meta["mode"]) == ("cpu-test", 0.10, "unary")
    assert meta["server_info"]["model_id"] == "tiny.en"
    assert meta["server_info"]["max_batch_size"] == real_server.settings.max_batch_size
    assert meta["server_info"]["device_name"]
    assert (meta["dataset"]["files"], meta["dataset"]["with_reference"]) == (7, 7)
    assert meta["loadgen_version"] and meta["started_at"]
    assert [lv["requests"] for lv in meta["levels"]] == [int(r["requests"]) for r in rows]

    records = read_csv(out / "records.csv")
    assert {r["status"] for r in records} == {"OK"}
    assert "measure" in {r["phase"] for r in records}
    # Four users in flight share model calls: that is what the server batches for.
    assert max(int(r["batch_size"]) for r in records if r["concurrency"] == "4") > 1
    measured = [r for r in records if r["phase"] == "measure"]
    assert len(measured) == sum(int(r["requests"]) for r in rows)
    assert all(r["transcript"] for r in measured)

    for name in RUN_FILES[3:-1]:
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 5
    assert "[1/3 closed c=1]" in result.stderr and "p99" in result.stderr  # progress
    assert "| closed | 4 |" in result.stdout  # the table at the end


def test_stream_mode_with_stability_windows(real_server, tmp_path: Path):
    """--mode stream replayed as fast as the server reads (--pace max), measured with
    --stability (capped): the windows compare the final lag."""
    require_data()
    out = tmp_path / "stream"
    result = loadgen(
        "run", "--target", real_server.address, "--mode", "stream",
        "--dataset", str(LIBRISPEECH / "test-clean"), "--limit", "3",
        "--streams", "2", "--pace", "max", "--warmup", "0", "--out", str(out),
        "--stability", "--duration", "2", "--max-windows", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    (row,) = read_csv(out / "summary.csv")
    assert int(row["utterances"]) >= 2 and int(row["errors"]) == 0, row
    assert row["behind_streams"] == "0", row  # no schedule to fall behind
    assert float(row["wer"]) < WER_BOUND, row
    assert row["windows"] == "3" and row["stable"] in ("true", "false")
    assert row["stability"].endswith(")") and "after 3 windows (goodput ±" in row["stability"]
    assert float(row["duration_s"]) == 6.0  # the last three windows
    assert json.loads((out / "summary.json").read_text())["mode"] == "stream"


@pytest.fixture
def slow_fake_server() -> Iterator[str]:
    """The real server with the fake model at 0.25 s per window, one window per batch: it
    completes at most 4 windows per second, whatever it is offered."""
    model = FakeModel()
    model.delay_s = 0.25
    server = EmbeddedServer(Settings(max_batch_size=1, max_wait_ms=0, max_queue_size=512), model)
    yield server.start().address
    server.stop()


def test_overloaded_open_loop_reports_goodput_below_offered_and_saturated(
    slow_fake_server: str, tmp_path: Path
):
    """Offered 8 requests/s to a server that completes at most 4: the level reports what came
    back (goodput), flags itself saturated, and --limit beyond the split is said out loud."""
    require_data()
    out = tmp_path / "overload"
    result = loadgen(
        "run", "--target", slow_fake_server, "--dataset", str(LIBRISPEECH / "test-clean"),
        "--limit", "16", "--rate", "8", "--duration", "3", "--warmup", "1", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "--limit 16 but" in result.stderr and "only 7 files" in result.stderr
    (level,) = json.loads((out / "summary.json").read_text())["levels"]
    assert level["offered_rps"] == 8.0 and level["sent_rps"] > 4.5
    assert 0 < level["rps"] <= 4.5 and level["saturated"] is True, level
    assert "saturated" in result.stderr and "SATURATED" in result.stdout


@pytest.mark.parametrize(
    ("api", "mode", "method"),
    [
        ("google", "unary", "google.cloud.speech.v1.Speech/Recognize"),
        ("riva", "stream", "nvidia.riva.asr.RivaSpeechRecognition/StreamingRecognize"),
    ],
)
def test_vendor_apis(real_server, tmp_path: Path, api: str, mode: str, method: str):
    """--api google|riva sends those vendors' requests to the same server."""
    require_data()
    out = tmp_path / api
    # Streams as fast as the server reads (--pace max): live pacing is tested on asr.v1.
    levels = ["--streams", "2", "--pace", "max"] if mode == "stream" else ["--concurrency", "2"]
    result = loadgen(
        "run", "--target", real_server.address, "--api", api, "--mode", mode,
        "--dataset", str(LIBRISPEECH / "test-clean"), "--limit", "3",
        *levels, "--warmup", "0", "--duration", "2", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    (row,) = read_csv(out / "summary.csv")
    sent = row["utterances"] if mode == "stream" else row["requests"]
    assert int(sent) >= 2 and int(row["errors"]) == 0, row
    assert float(row["wer"]) < WER_BOUND, row
    assert json.loads((out / "summary.json").read_text())["api"] == api
    registry = real_server.handle.metrics.registry
    assert registry.get_sample_value("asr_requests_total", {"method": method, "code": "OK"}) >= 2


class UnaryOnlySpeech(asr_pb2_grpc.SpeechServicer):
    """Recognize and GetServerInfo only: the generated base class answers every other rpc
    (StreamingRecognize) with UNIMPLEMENTED, as a server without streaming does. Recognize
    answers a fixed text and keeps the metadata it was sent."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def GetServerInfo(self, request, context):
        return asr_pb2.ServerInfo(model_id="fake", device_name="none", max_batch_size=1)

    def Recognize(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        alternative = asr_pb2.SpeechRecognitionAlternative(transcript="hello")
        result = asr_pb2.SpeechRecognitionResult(alternatives=[alternative])
        return asr_pb2.RecognizeResponse(results=[result])


def serve_fake(credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    servicer = UnaryOnlySpeech()
    asr_pb2_grpc.add_SpeechServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("asr.v1.Speech", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    server.servicer = servicer  # type: ignore[attr-defined]
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def unary_only_server() -> Iterator[str]:
    server, address = serve_fake()
    yield address
    server.stop(None).wait()


def test_stream_mode_is_rejected_when_the_server_lacks_it(unary_only_server: str, tmp_path: Path):
    require_data()
    out = tmp_path / "rejected"
    result = loadgen(
        "run", "--target", unary_only_server, "--mode", "stream",
        "--dataset", str(LIBRISPEECH / "test-clean"), "--streams", "1",
        "--duration", "1", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-4000:]
    assert "does not implement StreamingRecognize" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_bad_flags_exit_2_with_the_flag_named(tmp_path: Path):
    result = loadgen(
        "run", "--target", "no-port", "--dataset", str(tmp_path), "--out", str(tmp_path / "o"),
        "--concurrency", "1",
    )  # fmt: skip
    assert result.returncode == 2
    assert "--target must be HOST:PORT" in result.stderr
    result = loadgen("run", "--target", "127.0.0.1:1", "--dataset", "d", "--out", "o")
    assert result.returncode == 2 and "--concurrency and/or --rate" in result.stderr


def test_plain_locustfile_headless(real_server, tmp_path: Path):
    """The same user class under Locust's own command line (web UI's engine, headless here)."""
    require_data()
    out = tmp_path / "locust"
    command = [
        sys.executable, "-m", "locust", "-f", "loadgen/locustfile.py", "--headless",
        "--users", "2", "--spawn-rate", "2", "--run-time", "4s", "--stop-timeout", "120",
        "--only-summary", "--host", real_server.address,
        "--dataset", str(LIBRISPEECH / "test-clean"), "--loadgen-out", str(out),
    ]  # fmt: skip
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Recognize" in result.stdout + result.stderr  # Locust's own statistics table
    (row,) = read_csv(out / "summary.csv")
    assert int(row["requests"]) >= 1 and int(row["errors"]) == 0 and row["concurrency"] == "2"
    assert float(row["wer"]) < WER_BOUND


def self_signed(tmp_path: Path) -> tuple[bytes, bytes]:
    """A key and certificate for 127.0.0.1, made with the openssl command line."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    command = [
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    return key.read_bytes(), cert.read_bytes()


def test_tls_and_metadata_reach_the_server(tmp_path: Path):
    require_data()
    key, cert = self_signed(tmp_path)
    server, address = serve_fake(grpc.ssl_server_credentials([(key, cert)]))
    try:
        out = tmp_path / "tls"
        result = loadgen(
            "run", "--target", address, "--tls", "--ca-cert", str(tmp_path / "cert.pem"),
            "--metadata", "Authorization=Bearer abc", "--metadata", "x-tenant=t1",
            "--dataset", str(LIBRISPEECH / "test-clean"), "--limit", "2",
            "--concurrency", "1", "--duration", "1", "--warmup", "0", "--out", str(out),
        )  # fmt: skip
    finally:
        server.stop(None).wait()
    assert result.returncode == 0, result.stderr[-4000:]
    (row,) = read_csv(out / "summary.csv")
    assert int(row["requests"]) >= 1 and int(row["errors"]) == 0
    seen = server.servicer.metadata  # type: ignore[attr-defined]
    assert seen and all(
        m.get("authorization") == "Bearer abc" and m.get("x-tenant") == "t1" for m in seen
    )
