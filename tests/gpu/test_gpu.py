"""On a CUDA device: both engines, fp16 and bf16, joins and leaves, drafts, fallbacks and word
times with real tiny.en weights on real speech (skipped without CUDA; run by
`python -m loadgen.gpu.check`). The checkpoint is WHISPER_GRPC_TEST_CHECKPOINT (the GPU check's
dequantized tiny.en) or tiny.en provisioned as usual; the audio is WHISPER_GRPC_TEST_AUDIO (a
folder of FLAC files with their *.trans.txt) or ../shared's test-other split."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from server.batching.continuous import ContinuousEngine, EngineConfig
from server.models.base import DecodeOptions, WindowTask

# WHISPER_GRPC_TEST_DEVICE=cpu runs these on the CPU: a slow dry run of the tests themselves.
DEVICE = os.environ.get("WHISPER_GRPC_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
]
# The GPU check passes its --dtypes and --files on (a CPU dry run: float32, a few clips).
DTYPES = os.environ.get("WHISPER_GRPC_TEST_DTYPES", "float16,bfloat16").split(",")
CLIPS = int(os.environ.get("WHISPER_GRPC_TEST_CLIPS", "24"))
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def clips() -> list[tuple[np.ndarray, str]]:
    folder = os.environ.get("WHISPER_GRPC_TEST_AUDIO")
    if folder:  # the GPU pack's audio: LibriSpeech's layout, one folder
        lines = [
            line for trans in sorted(Path(folder).glob("*.trans.txt"))
            for line in trans.read_text().splitlines()
        ]  # fmt: skip
        paths = [Path(folder) / f"{line.split()[0]}.flac" for line in lines]
        texts = [line.partition(" ")[2] for line in lines]
    else:
        from tests.conftest import librispeech_items, require_data

        require_data()
        items = librispeech_items("test-other")
        paths, texts = [p for _, p, _ in items], [t for _, _, t in items]
    return [(sf.read(p, dtype="float32")[0], t) for p, t in zip(paths[:CLIPS], texts, strict=False)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    given = os.environ.get("WHISPER_GRPC_TEST_CHECKPOINT")
    if given:
        return given
    from server.checkpoints.provision import resolve_model

    return str(resolve_model("tiny.en", tmp_path_factory.mktemp("cache")).name_or_path)


_models: dict[str, Any] = {}


def model_in(checkpoint: str, dtype: str) -> Any:
    from server.models.whisper import WhisperModel

    if dtype not in _models:
        _models[dtype] = WhisperModel(checkpoint, "tiny.en", device=DEVICE, dtype=dtype)
    return _models[dtype]


def tasks(model: Any, clips: list[tuple[np.ndarray, str]], **options: Any) -> list[WindowTask]:
    return [
        WindowTask(model.prepare(s), len(s) / 16_000, DecodeOptions(**options)) for s, _ in clips
    ]


def run(model: Any, batches: list[list[WindowTask]], **config: Any) -> list[list[Any]]:
    """Each list of windows submitted at once, all lists concurrently, on a fresh engine."""

    async def main() -> list[list[Any]]:
        with ThreadPoolExecutor(1) as worker:
            engine = ContinuousEngine(model, worker, EngineConfig(**config))
            engine.start()
            try:
                got = await asyncio.gather(*(engine.submit_many(b) for b in batches))
                assert engine.in_flight == 0
                return [[r.value for r in rs] for rs in got]
            finally:
                await engine.stop()

    return asyncio.run(main())


def agreement(a: list[Any], b: list[Any]) -> float:
    return sum(x.text == y.text for x, y in zip(a, b, strict=True)) / len(a)


@pytest.mark.parametrize("dtype", DTYPES)
def test_continuous_engine_matches_generate_on_the_gpu(checkpoint, clips, dtype) -> None:
    model = model_in(checkpoint, dtype)
    windows = tasks(model, clips)
    generated = model.run_batch(windows[:1]) + model.run_batch(windows[1:])  # plain generate
    alone = [run(model, [[w]])[0][0] for w in windows[:6]]
    together = run(model, [[w] for w in windows], max_active=16, max_batch_size=8)
    assert agreement(alone, generated[:6]) >= 5 / 6  # kernels differ slightly by batch shape
    assert agreement([r[0] for r in together], generated) >= 0.85
    assert next(model.model.parameters()).device.type == torch.device(DEVICE).type


@pytest.mark.parametrize("dtype", DTYPES)
def test_drafts_and_joins_mid_decode_keep_the_transcripts(checkpoint, clips, dtype) -> None:
    model = model_in(checkpoint, dtype)
    windows = tasks(model, clips)
    first = run(model, [windows], max_active=24, max_batch_size=8)[0]
    drafted = [
        WindowTask(w.features, w.duration_s, DecodeOptions(draft=r.tokens[: len(r.tokens) // 2]))
        for w, r in zip(windows, first, strict=True)
    ]
    # 4 slots for 24 windows: most join while others decode, and leave at their own end.
    again = run(model, [[d] for d in drafted], max_active=4, max_batch_size=2)
    assert agreement([r[0] for r in again], first) >= 0.85


@pytest.mark.parametrize("dtype", DTYPES)
def test_fallbacks_and_word_times_on_the_gpu(checkpoint, clips, dtype) -> None:
    model = model_in(checkpoint, dtype)
    some = clips[:4]
    words = run(model, [tasks(model, some, word_timestamps=True)])[0]
    beam = run(model, [tasks(model, some, beam_size=2)])[0]
    prompted = run(model, [tasks(model, some, prompt="A story read aloud.")])[0]
    for result, (samples, _) in zip(words, some, strict=True):
        assert result.words and result.text
        assert all(0 <= w.start_s <= w.end_s <= len(samples) / 16_000 + 0.01 for w in result.words)
    assert all(r.text for r in beam + prompted)


@pytest.mark.parametrize("engine", ["continuous", "generate"])
def test_both_engines_through_grpc_on_the_gpu(checkpoint, clips, engine) -> None:
    from asr.v1 import asr_pb2
    from server.config import Settings
    from server.embedded import EmbeddedServer
    from tests.conftest import wav_bytes

    model = model_in(checkpoint, DTYPES[0])
    server = EmbeddedServer(Settings(engine=engine, max_batch_size=8, warmup=False), model)
    server.start()
    try:
        stub = server.stub()
        info = stub.GetServerInfo(asr_pb2.GetServerInfoRequest())
        assert info.device.startswith(DEVICE) and info.dtype == DTYPES[0]

        def call(samples: np.ndarray) -> str:
            audio = asr_pb2.RecognitionAudio(content=wav_bytes(samples, 16_000))
            response = stub.Recognize(asr_pb2.RecognizeRequest(audio=audio), timeout=120)
            return " ".join(r.alternatives[0].transcript for r in response.results)

        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(call, [s for s, _ in clips[:16]]))
    finally:
        server.stop()
    reference = [r.text for r in model.run_batch(tasks(model, clips[:16]))]
    same = sum(a == b for a, b in zip(texts, reference, strict=True))
    assert same >= 0.8 * len(texts), list(zip(texts, reference, strict=True))
