"""`python -m server.healthcheck`, the containers' healthcheck, run as the container runs it (a
subprocess) against a real server on loopback: failing while the model isn't served, passing
once it is, failing again while draining, and failing fast where nothing listens.

The server runs on this test's event loop, so probes are awaited subprocesses: the loop keeps
answering them. No sleeps: each state is set before the probe that checks it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from server.app import NOT_SERVING, ServerHandle, build_server
from server.config import Settings
from server.models.fake import FakeModel

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 20.0


async def probe(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the probe; (exit status, everything it printed)."""
    child_env = {k: v for k, v in os.environ.items() if k != "WHISPER_GRPC_PORT"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.healthcheck",
        *args,
        cwd=ROOT,
        env={**child_env, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, output.decode()


@pytest.fixture
async def server() -> AsyncIterator[ServerHandle]:
    """Listening, NOT_SERVING: no model yet."""
    handle = await build_server(Settings(host="127.0.0.1", port=0, metrics_port=-1))
    await handle.server.start()
    yield handle
    await handle.drain_and_stop(0)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port held by a bound socket that doesn't listen: connecting is refused, and nothing
    else can take the port while the test runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def one_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    return lines[0]


async def test_fails_before_the_model_is_served_and_passes_after(server: ServerHandle) -> None:
    address = f"127.0.0.1:{server.port}"
    code, output = await probe("--target", address, "--timeout", str(TIMEOUT_S))
    assert code == 1
    assert one_line(output) == f"NOT_SERVING: 'asr.v1.Speech' at {address}"

    await server.serve_model(FakeModel())
    code, output = await probe("--address", address, "--timeout", str(TIMEOUT_S))
    assert code == 0
    assert one_line(output) == f"SERVING: 'asr.v1.Speech' at {address}"
    code, output = await probe("--address", address, "--service", "")
    assert (code, one_line(output)) == (0, f"SERVING: the server at {address}")


async def test_fails_again_while_draining(server: ServerHandle) -> None:
    address = f"127.0.0.1:{server.port}"
    await server.serve_model(FakeModel())
    assert (await probe("--address", address))[0] == 0
    await server.set_health(NOT_SERVING)  # what drain_and_stop() does first on SIGTERM
    code, output = await probe("--address", address)
    assert code == 1 and one_line(output).startswith("NOT_SERVING")


async def test_default_address_follows_the_servers_port_variable(server: ServerHandle) -> None:
    # The Dockerfiles' HEALTHCHECK passes no --address: WHISPER_GRPC_PORT, as for the server.
    await server.serve_model(FakeModel())
    code, output = await probe(env={"WHISPER_GRPC_PORT": str(server.port)})
    assert code == 0, output
    assert f"127.0.0.1:{server.port}" in output


async def test_unknown_service_fails(server: ServerHandle) -> None:
    await server.serve_model(FakeModel())
    code, output = await probe("--address", f"127.0.0.1:{server.port}", "--service", "nope.v1.X")
    assert code == 1
    assert one_line(output).startswith("NOT_FOUND:") and "'nope.v1.X'" in output


async def test_closed_port_fails_fast_with_a_clear_message(closed_port: int) -> None:
    address = f"127.0.0.1:{closed_port}"
    started = time.monotonic()
    code, output = await probe("--address", address, "--timeout", str(TIMEOUT_S))
    elapsed = time.monotonic() - started
    assert code == 1
    line = one_line(output)
    assert line.startswith(f"UNAVAILABLE: no answer from {address}")
    assert "refused" in line.lower()
    # Refused at once, not after waiting out the deadline (allowing for interpreter start-up).
    assert elapsed < TIMEOUT_S / 2


async def test_bad_arguments_fail_with_status_1_not_docker_reserved_2() -> None:
    code, output = await probe("--timeout", "0")
    assert code == 1 and "--timeout must be positive" in output


async def test_probe_imports_neither_torch_nor_the_server(closed_port: int) -> None:
    # -X importtime lists every module the probe imported.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "server.healthcheck",
        "--address",
        f"127.0.0.1:{closed_port}",
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in err.decode().splitlines()
        if line.startswith("import time:")
    }
    assert "grpc_health.v1.health_pb2_grpc" in imported
    heavy = {m for m in imported if m.split(".")[0] in ("torch", "transformers", "numpy")}
    assert heavy == set()
    assert {m for m in imported if m.startswith("server.")} <= {"server.healthcheck"}
