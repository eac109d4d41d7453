"""Device placement, proven on a CPU: every model path runs inside `DeviceGuard`, where a tensor
made without `device=` lands on `meta` and any op mixing devices raises, as CUDA would. The
model is a random-weight Whisper behind the real `WhisperModel` (tiny.en's tokenizer and
generation config), served by both engines: the continuous engine's joins and leaves, drafts
kept and rejected, cancellation mid-decode, language detection and word times in the shared
decode, and every `generate` fallback (beam search, temperature, prompt)."""

from __future__ import annotations

import ast
import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from server.batching.continuous import ContinuousEngine, EngineConfig
from server.batching.micro import BatcherConfig, MicroBatcher
from server.models.base import DecodeOptions, WindowTask
from server.models.whisper import WhisperModel
from tests.device_guard import DeviceGuard, GuardedExecutor, PlacementError
from tests.random_whisper import make_random_checkpoint

MAX_NEW_TOKENS = 6


def load(
    tiny_en_dir: Path, out: Path, multilingual: bool = False, dtype: str = "float32",
    max_new_tokens: int = MAX_NEW_TOKENS,
):  # fmt: skip
    path = make_random_checkpoint(tiny_en_dir, out, multilingual)
    return WhisperModel(str(path), "random-tiny", "cpu", dtype, max_new_tokens=max_new_tokens)


@pytest.fixture(scope="module")
def english(tiny_en_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> WhisperModel:
    return load(tiny_en_dir, tmp_path_factory.mktemp("random-en"))


@pytest.fixture(scope="module")
def multilingual(tiny_en_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> WhisperModel:
    return load(tiny_en_dir, tmp_path_factory.mktemp("random-ml"), multilingual=True)


@pytest.fixture
def guarded():
    pool = GuardedExecutor()
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


def audio(seed: int, seconds: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(16_000 * seconds))).astype(np.float32)


def window(model: WhisperModel, seed: int, options: DecodeOptions | None = None) -> WindowTask:
    return WindowTask(model.prepare(audio(seed)), 1.0, options or DecodeOptions())


def test_the_guard_catches_a_tensor_made_without_a_device() -> None:
    """The proxy itself: the bug of issue #10 (an index built on the CPU) raises inside it."""
    logp = torch.randn(3, 5)
    with DeviceGuard(watched=(str(Path(__file__).parent),)):  # this file's factories too
        with pytest.raises(PlacementError, match="without device"):
            logp.gather(1, torch.as_tensor([1, 2, 0]).unsqueeze(1))
        placed = torch.as_tensor([1, 2, 0], device=logp.device).unsqueeze(1)
        assert logp.gather(1, placed).shape == (3, 1)


class HoldFirstStep:
    """Holds the engine's first decode step until released, so windows join mid-decode."""

    def __init__(self, engine: ContinuousEngine) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self.steps = 0
        self._step = engine.runtime.step
        engine.runtime.step = self  # type: ignore[method-assign]

    def __call__(self, max_rows: int | None = None) -> None:
        self.steps += 1
        if self.steps == 1:
            self.entered.set()
            assert self.release.wait(30)
        self._step(max_rows)


async def test_continuous_engine_joins_leaves_drafts_and_cancels(english, guarded) -> None:
    engine = ContinuousEngine(english, guarded, EngineConfig(max_active=8, max_batch_size=4))
    engine.start()
    plain = await asyncio.wait_for(engine.submit_many([window(english, s) for s in (1, 2)]), 120)
    tokens = plain[0].value.tokens
    assert len(tokens) == MAX_NEW_TOKENS
    gate = HoldFirstStep(engine)
    first = engine.enqueue([window(english, 3), window(english, 4)])
    assert await asyncio.to_thread(gate.entered.wait, 30)  # decoding, held at its first step
    right = DecodeOptions(draft=tokens[:3])  # kept: greedy agrees with every token
    wrong = DecodeOptions(draft=(tokens[0], (tokens[1] + 1) % 50_000, tokens[2]))  # rejected
    joining = engine.enqueue([window(english, 1, right), window(english, 1, wrong)])
    cancelled = engine.enqueue([window(english, 5)])[0]
    cancelled.cancel()  # leaves the batch at its next step (or never joins)
    gate.release.set()
    results = await asyncio.wait_for(asyncio.gather(*first, *joining), 120)
    assert [r.value.tokens for r in results[2:]] == [tokens, tokens]  # drafts change nothing
    assert engine.stats().decode_steps > 0 and engine.in_flight == 0
    await engine.stop()
    assert guarded.jobs > 0  # the decode loop ran on the guarded worker


@pytest.mark.parametrize(
    "options",
    [
        DecodeOptions(beam_size=2),
        DecodeOptions(temperature=0.7),
        DecodeOptions(prompt="a prompt of several words here"),
        DecodeOptions(word_timestamps=True),
    ],
    ids=["beam", "temperature", "prompt", "word-times"],
)
async def test_every_generate_fallback(english, guarded, options: DecodeOptions) -> None:
    engine = ContinuousEngine(english, guarded, EngineConfig(max_active=4))
    engine.start()
    results = await asyncio.wait_for(
        engine.submit_many([window(english, 1, options), window(english, 2, options)]), 120
    )
    # word times are computed in the shared decode (server.models.whisper_align)
    assert engine.stats().fallback_windows == (0 if options.word_timestamps else 2)
    if options.word_timestamps:
        assert all(r.value.words for r in results)
    await engine.stop()


async def test_language_detection_and_given_languages(multilingual, guarded) -> None:
    engine = ContinuousEngine(multilingual, guarded, EngineConfig(max_active=4))
    engine.start()
    detect, given = DecodeOptions(), DecodeOptions(language="fr", task="translate")
    results = await asyncio.wait_for(
        engine.submit_many([window(multilingual, 1, detect), window(multilingual, 2, given)]),
        120,
    )
    assert results[0].value.language in ("en", "fr") and results[1].value.language == "fr"
    assert engine.stats().fallback_windows == 0  # detected in the shared decode
    await engine.stop()


async def test_generate_engine_and_warmup(english, guarded) -> None:
    batcher: MicroBatcher[Any, Any] = MicroBatcher(
        english.run_batch, guarded, BatcherConfig(max_batch_size=4, max_wait_ms=0)
    )
    batcher.start()
    words = DecodeOptions(word_timestamps=True)
    results = await asyncio.wait_for(
        batcher.submit_many([window(english, 1), window(english, 2, words)]), 120
    )
    assert results[1].value.words
    await asyncio.wait_for(asyncio.wrap_future(guarded.submit(english.warmup, [2])), 120)
    await batcher.stop()


def test_every_tensor_factory_in_the_server_names_its_device() -> None:
    """The rule the guard enforces at run time, checked over all of server/ (paths the tests
    above don't reach too): `device=` on every factory call; `torch.from_numpy` (host memory
    by definition) only as the receiver of `.to(...)`."""
    from torch.utils._device import _device_constructors

    factories = {f.__name__ for f in _device_constructors()}
    server = Path(__file__).resolve().parents[2] / "server"
    offenders = []
    for path in sorted(server.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        moved = {
            id(node.func.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "to"
        }
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                continue
            name = node.func.attr
            named = any(k.arg == "device" for k in node.keywords)
            unmoved = name == "from_numpy" and id(node) not in moved
            if (name in factories and not named) or unmoved:
                offenders.append(f"{path.relative_to(server.parent)}:{node.lineno} torch.{name}")
    assert not offenders, offenders
