"""Word times and language detection in the continuous engine with real weights, against the
`generate` path (`WhisperModel.run_batch`) on real speech: tiny.en's word times on the JFK
clip within 20 ms of generate's, and the multilingual base model's detected language equal
to generate's on English clips (and on espeak-ng's French and German, when it is installed)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from server.batching.continuous import ContinuousEngine, EngineConfig
from server.config import Settings
from server.models.base import DecodeOptions, WindowResult, WindowTask
from tests.conftest import JFK_WAV, librispeech_items, require_data


def engine_results(model: Any, tasks: list[WindowTask]) -> list[WindowResult]:
    async def run() -> list[WindowResult]:
        with ThreadPoolExecutor(1) as worker:
            engine = ContinuousEngine(model, worker, EngineConfig(max_active=8))
            engine.start()
            try:
                return [b.value for b in await asyncio.wait_for(engine.submit_many(tasks), 300)]
            finally:
                await engine.stop()

    return asyncio.run(run())


def window(model: Any, samples: np.ndarray, options: DecodeOptions) -> WindowTask:
    return WindowTask(
        model.prepare(samples[: 30 * 16_000]), min(30.0, len(samples) / 16_000), options
    )


def read(path: Path) -> np.ndarray:
    samples, rate = sf.read(path, dtype="float32")
    assert rate == 16_000
    return samples


def test_word_times_on_jfk_match_the_generate_path(real_model: Any) -> None:
    require_data()
    task = window(real_model, read(JFK_WAV), DecodeOptions(word_timestamps=True))
    (want,) = real_model.run_batch([task])
    (got,) = engine_results(real_model, [task])
    assert got.text == want.text and len(want.words) >= 20
    assert [w.word for w in got.words] == [w.word for w in want.words]
    for a, b in zip(got.words, want.words, strict=True):
        assert abs(a.start_s - b.start_s) <= 0.02 and abs(a.end_s - b.end_s) <= 0.02, (a, b)


@pytest.fixture(scope="module")
def base_model() -> Any:
    from server.models.loader import load_model

    return load_model(Settings(model="base", dtype="float32", warmup=False))


def espeak(text: str, voice: str, out: Path) -> np.ndarray:
    wav = out / f"{voice}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), text], check=True, timeout=60)
    samples, rate = sf.read(wav, dtype="float32")
    n = int(len(samples) * 16_000 / rate)  # espeak-ng writes 22.05 kHz
    return np.interp(np.linspace(0, len(samples) - 1, n), np.arange(len(samples)), samples).astype(
        np.float32
    )


def test_language_detection_matches_generate(base_model: Any, tmp_path: Path) -> None:
    require_data()
    clips = [read(JFK_WAV)] + [read(p) for _, p, _ in librispeech_items("test-other")[:3]]
    if shutil.which("espeak-ng"):
        clips.append(
            espeak("Bonjour, je voudrais un café et un croissant, s'il vous plaît.", "fr", tmp_path)
        )
        clips.append(
            espeak("Guten Morgen, wie geht es Ihnen heute? Das Wetter ist schön.", "de", tmp_path)
        )
    tasks = [window(base_model, c, DecodeOptions()) for c in clips]
    want = [base_model.run_batch([t])[0] for t in tasks]
    got = engine_results(base_model, tasks)
    assert got[0].language == "en"
    assert [r.language for r in got] == [w.language for w in want]
    assert [r.text for r in got] == [w.text for w in want]
