"""Real tiny.en in bfloat16 through the gRPC server (default continuous engine) on the 100
LibriSpeech test-other files: within 0.5 WER points of float32 on the same files, and
`GetServerInfo` says which dtype runs and why."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from asr.v1 import asr_pb2
from loadgen.wer import word_error_rate
from server.config import Settings
from server.embedded import EmbeddedServer
from tests.conftest import librispeech_items, require_data


def transcribe_all(settings: Settings, paths: list[Path]) -> tuple[list[str], Any]:
    from server.models.loader import load_model

    server = EmbeddedServer(settings, load_model(settings)).start()
    try:
        stub = server.stub()
        info = stub.GetServerInfo(asr_pb2.GetServerInfoRequest(), timeout=30)

        def call(path: Path) -> str:
            audio = asr_pb2.RecognitionAudio(content=path.read_bytes())
            response = stub.Recognize(asr_pb2.RecognizeRequest(audio=audio), timeout=300)
            return " ".join(r.alternatives[0].transcript for r in response.results)

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(call, paths)), info
    finally:
        server.stop()


def test_bfloat16_keeps_the_word_error_rate_of_float32(real_settings: Settings) -> None:
    require_data()
    items = librispeech_items("test-other")
    if len(items) < 100:
        pytest.skip(f"needs the 100 test-other files, found {len(items)}")
    paths = [path for _, path, _ in items[:100]]
    references = [text for _, _, text in items[:100]]
    wer = {}
    for dtype in ("float32", "bfloat16"):
        texts, info = transcribe_all(real_settings.replace(dtype=dtype, max_active=16), paths)
        assert info.dtype == dtype and info.dtype_reason == f"--dtype {dtype}"
        wer[dtype] = word_error_rate(references, texts)
    assert abs(wer["bfloat16"] - wer["float32"]) <= 0.005, wer
    assert wer["float32"] < 0.25, wer  # and both are real transcripts
