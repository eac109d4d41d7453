"""Shared fixtures: paths to the real test audio in ../shared/data, and helpers."""

from __future__ import annotations

import io
import os
from pathlib import Path

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
