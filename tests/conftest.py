"""Shared fixtures: paths to the real test audio in ../shared/data, and helpers; and the
split of tests by cost.

`make test-fast` runs `-m "not slow and not gpu"`: the tests that start no subprocess and load
no real weights. A test is slow when it is under tests/integration (real weights, real
servers), in one of SLOW_MODULES (Docker Compose, kubectl, buf), or marked
`@pytest.mark.slow` itself. A fast test that starts a subprocess fails and says to mark it.
"""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

# Servers started by tests (in subprocesses too) decode eagerly: compiling the decode step
# takes minutes; the one test that compiles says so (tests/unit/test_static_step.py).
os.environ.setdefault("WHISPER_GRPC_COMPILE", "off")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
LIBRISPEECH = DATA / "LibriSpeech"
JFK_FLAC = DATA / "jfk" / "jfk.flac"
JFK_WAV = DATA / "jfk" / "jfk.wav"
SLOW_DIRS = ("integration", "gpu")
SLOW_MODULES = (
    "test_buf.py",
    "test_deploy.py",
    "test_k8s.py",
    "test_gpu_check.py",
    "test_gpu_pack.py",
)
"""Whole modules whose fixtures run buf, docker compose, kubectl or bash."""
CHEAP_COMMANDS = ("uname",)
"""Subprocesses a fast test may start: `platform.processor()` runs `uname -p` (the device
name of a CPU)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath))
        parts = path.relative_to(ROOT / "tests").parts if path.is_relative_to(ROOT) else ()
        if (parts and parts[0] in SLOW_DIRS) or path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fast_tests_start_no_subprocess(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """In a test not marked slow, starting a subprocess is an error that names the test."""
    if request.node.get_closest_marker("slow") is None:
        start = subprocess.Popen.__init__

        def refuse(self: subprocess.Popen[bytes], args: Any, *rest: Any, **kw: Any) -> None:
            if isinstance(args, (list, tuple)) and args and args[0] in CHEAP_COMMANDS:
                return start(self, args, *rest, **kw)
            raise AssertionError(
                f"{request.node.nodeid} starts a subprocess ({args!r}): mark it "
                "@pytest.mark.slow, or make it cheaper"
            )

        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    yield


def require_data() -> None:
    if not LIBRISPEECH.is_dir():
        pytest.skip(f"test audio not found at {DATA}")


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, subtype=subtype, format=fmt)
    return buf.getvalue()


def tone(freq_hz: float, seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.5 * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono] * channels, axis=1)


def librispeech_items(split: str = "test-clean") -> list[tuple[str, Path, str]]:
    """(utterance id, flac path, reference transcript) for a split, sorted by id."""
    items = []
    for trans in sorted((LIBRISPEECH / split).rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            uid, _, text = line.partition(" ")
            path = trans.parent / f"{uid}.flac"
            if path.exists():
                items.append((uid, path, text))
    return items


@pytest.fixture(scope="session")
def tiny_en_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny.en converted into a throwaway cache (its tokenizer and configs; real weights)."""
    from server.checkpoints.provision import resolve_model

    resolved = resolve_model("tiny.en", tmp_path_factory.mktemp("tiny-en-cache"))
    assert resolved.local_path is not None
    return resolved.local_path
