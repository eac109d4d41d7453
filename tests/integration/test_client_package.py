"""The client-only distribution (clients/python: the asr.v1 stubs and asr/client.py) built as
a wheel, installed into a fresh virtual environment, and used against a real server on
loopback: it installs grpcio and protobuf only, never torch, transformers or numpy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import Settings
from server.embedded import EmbeddedServer
from server.models.fake import FakeModel
from tests.conftest import JFK_WAV, ROOT, require_data

USE = """
import json, sys
from asr.client import SpeechClient, paced_chunks
import wave
address, wav_path = sys.argv[1], sys.argv[2]
with SpeechClient(address, timeout_s=30) as client:
    unary = client.recognize_file(wav_path)
    with wave.open(wav_path, "rb") as w:
        pcm, rate = w.readframes(w.getnframes()), w.getframerate()
    updates = list(client.stream(paced_chunks(pcm, rate), sample_rate_hz=rate))
    info = client.info()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "numpy"))
print(json.dumps({
    "unary": unary.text, "finals": [u.text for u in updates if u.is_final],
    "model": info.model_id, "max_streams": info.max_streams, "heavy": heavy,
    "from": __import__("asr").__file__,
}))
"""


def run(*args: str | Path, **kw) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=300, check=False, **kw
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def fake_server():
    server = EmbeddedServer(Settings(max_streams=5), FakeModel()).start()
    yield server
    server.stop()


def test_client_wheel_installs_alone_and_talks_to_the_server(fake_server, tmp_path):
    require_data()
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", wheels, ROOT / "clients" / "python")  # fmt: skip
    [wheel] = wheels.glob("whisper_grpc_client-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check"]
    run(*pip, "install", "-q", "-c", ROOT / "constraints.txt", wheel)
    listed = json.loads(run(*pip, "list", "--format=json").stdout)
    installed = {p["name"].lower() for p in listed}
    assert {"grpcio", "protobuf", "whisper-grpc-client"} <= installed
    assert not installed & {"torch", "transformers", "numpy", "whisper-grpc"}

    done = run(venv / "bin" / "python", "-c", USE, fake_server.address, JFK_WAV, cwd=tmp_path)
    got = json.loads(done.stdout)
    assert got["from"].startswith(str(venv))  # the installed copy, not the repository's
    assert got["unary"].startswith("n=176000")  # the fake model saw the 11 s clip
    assert got["finals"] and got["heavy"] == []
    assert (got["model"], got["max_streams"]) == ("fake", 5)
