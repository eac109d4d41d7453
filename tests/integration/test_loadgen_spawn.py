"""The one server spawner (loadgen.spawn): a real `python -m server` subprocess on a free
loopback port, SERVING before it returns, stopped cleanly; a server that can't start fails the
wait at once with its log's end; and `loadgen run --spawn-server` (what `make loadtest` runs)
sweeps the shipped sample with no network."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from asr.v1 import asr_pb2, asr_pb2_grpc
from loadgen.spawn import ServerStartError, start_server
from tests.integration.test_loadgen_run import loadgen, read_csv
from tests.random_whisper import make_random_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def random_model(tiny_en_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_random_checkpoint(tiny_en_dir, tmp_path_factory.mktemp("random")))


def test_spawned_server_is_serving_on_return_and_stops_cleanly(
    random_model: str, tmp_path: Path
) -> None:
    import grpc

    log = tmp_path / "server.log"
    server = start_server(["--model", random_model, "--max-new-tokens", "4"], log_path=log)
    try:
        with grpc.insecure_channel(server.address) as channel:
            audio = asr_pb2.RecognitionAudio(content=(ROOT / "samples" / "jfk.wav").read_bytes())
            response = asr_pb2_grpc.SpeechStub(channel).Recognize(
                asr_pb2.RecognizeRequest(audio=audio), timeout=120
            )
        assert response.results  # served, no wait beyond start_server's own
    finally:
        assert server.stop() == 0  # SIGTERM: drained and exited cleanly
    assert "SERVING" in log.read_text()


def test_a_server_that_cannot_start_fails_the_wait_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ServerStartError) as caught:
        start_server(["--model", str(tmp_path / "missing")], log_path=tmp_path / "server.log")
    assert time.monotonic() - started < 120  # not the 600 s timeout
    assert "exited (1) before SERVING" in str(caught.value)
    assert "does not exist" in str(caught.value)  # the end of its log


def test_run_spawn_server_sweeps_the_shipped_sample(random_model: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = loadgen(
        "run", "--spawn-server", f"--server-args=--model {random_model} --max-new-tokens 4",
        "--concurrency", "1", "--duration", "2", "--warmup", "0", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = read_csv(out / "summary.csv")
    assert int(row["samples"]) > 0 and row["errors"] == "0"
    assert "SERVING" in (out / "server.log").read_text()
    assert '"spec": "sample"' in (out / "summary.json").read_text()
