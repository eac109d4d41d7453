"""Nothing greedy leaves the shared decode, and what does leave it can't hold the others:
language detection and word times run inside the continuous engine (no `generate` call) with
`generate`'s results, and a `generate` fallback (beam search...) yields to the decode steps
between its tokens. Random weights only; the decode loop is gated with events, never timed."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from server.batching.continuous import ContinuousEngine, EngineConfig
from server.models.base import DecodeOptions, WindowResult, WindowTask
from server.models.whisper import WhisperModel
from server.models.whisper_align import dynamic_time_warping, median_filter
from server.models.whisper_language import detect_languages
from server.models.whisper_step import GreedyRuntime
from tests.unit.test_continuous import (  # noqa: F401 - one_thread: an autouse fixture
    EN,
    EOS,
    FR,
    TinyWhisper,
    assert_same,
    one_thread,
    reference,
    windows,
)
from tests.unit.test_placement import load as random_whisper


@pytest.fixture
def worker():
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="model-worker")
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


class CountingGenerate:
    """Wraps a transformers model's `generate` and counts its calls."""

    def __init__(self, hf: Any) -> None:
        self.calls = 0
        self._generate = hf.generate
        hf.generate = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._generate(*args, **kwargs)


# -- language detection ------------------------------------------------------------------------
def test_detection_takes_the_best_language_token_only() -> None:
    logits = torch.tensor([[9.0, 1.0, 2.0, 3.0], [9.0, 3.0, 3.0, 1.0]])
    assert detect_languages(logits, [3, 1, 2]) == [3, 1]  # a tie goes to the lowest id


async def test_language_detection_runs_in_the_shared_decode(worker) -> None:
    """Windows with no language join the decode batch (no fallback, no generate call); each
    gets the language and the transcript `generate` gives it."""
    model = TinyWhisper(multilingual=True)
    feats = windows(8, seed=5)
    want = []
    for f in feats:
        tokens = generate_tokens(model, f)
        language = {EN: "en", FR: "fr"}[tokens[1]]
        want.append(reference(model, f, DecodeOptions(language=language)))
    assert {w.language for w in want} == {"en", "fr"}  # the test can tell them apart
    counting = CountingGenerate(model.model)
    engine = ContinuousEngine(model, worker, EngineConfig(max_active=8))
    engine.start()
    tasks = [WindowTask(f, 1.0, DecodeOptions(language=None)) for f in feats]
    got = await asyncio.wait_for(engine.submit_many(tasks), 60)
    for result, expected in zip(got, want, strict=True):
        assert_same(result.value, expected)
    assert counting.calls == 0 and model.fallback_batches == []
    assert engine.stats().fallback_windows == 0
    await engine.stop()


@torch.inference_mode()
def generate_tokens(model: TinyWhisper, features: np.ndarray) -> list[int]:
    """The whole sequence `generate` decodes with language detection (start tokens first)."""
    hf = model.model
    encoded = hf.get_encoder()(torch.from_numpy(features)[None])
    out = hf.generate(
        encoder_outputs=encoded, task="transcribe", max_new_tokens=4, return_dict_in_generate=True
    )
    return [t for t in out["sequences"][0].tolist() if t != EOS]


def test_detection_beside_a_given_language_in_one_join() -> None:
    """Detected and given languages join in one encoder pass; each keeps its own."""
    model = TinyWhisper(multilingual=True)
    runtime = GreedyRuntime(model, max_active=4)
    feats = windows(4, seed=5)
    options = [DecodeOptions(language=None), DecodeOptions(language="fr")] * 2
    prompts = [runtime.prompt(o) for o in options]
    seqs = runtime.join(feats, prompts, list(range(4)))  # type: ignore[arg-type]
    while not all(s.finished for s in seqs):
        runtime.step()
    for seq, f, o in zip(seqs, feats, options, strict=True):
        language = o.language or {EN: "en", FR: "fr"}[generate_tokens(model, f)[1]]
        assert_same(runtime.result(seq), reference(model, f, DecodeOptions(language=language)))


# -- the real WhisperModel with random weights: detection and word times -----------------------
def load(tiny_en_dir: Path, out: Path, multilingual: bool = False) -> WhisperModel:
    model: WhisperModel = random_whisper(tiny_en_dir, out, multilingual, max_new_tokens=24)
    return model


@pytest.fixture(scope="module")
def english(tiny_en_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> WhisperModel:
    return load(tiny_en_dir, tmp_path_factory.mktemp("random-en"))


@pytest.fixture(scope="module")
def multilingual(tiny_en_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> WhisperModel:
    return load(tiny_en_dir, tmp_path_factory.mktemp("random-ml"), multilingual=True)


def audio_window(model: WhisperModel, seed: int, seconds: float, options: DecodeOptions):
    rng = np.random.default_rng(seed)
    samples = (0.1 * rng.standard_normal(int(16_000 * seconds))).astype(np.float32)
    return WindowTask(model.prepare(samples), seconds, options)


def assert_same_words(got: WindowResult, want: WindowResult) -> None:
    assert got.text == want.text
    assert [w.word for w in got.words] == [w.word for w in want.words]
    for a, b in zip(got.words, want.words, strict=True):
        assert a.start_s == pytest.approx(b.start_s, abs=0.021)  # within a frame (20 ms)
        assert a.end_s == pytest.approx(b.end_s, abs=0.021)
        assert a.probability == pytest.approx(b.probability, abs=1e-4)


async def test_word_times_come_from_the_shared_decode_as_generate_gives_them(
    english: WhisperModel, worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows of different lengths (different real frames) with word times, decoded
    together: each gets the words and times `generate` gives it alone, without generate. The
    alignment pass runs at a padded length (server.models.shapes), not at each transcript's."""
    from server.models import whisper_align

    lengths: list[int] = []
    weights = whisper_align.alignment_weights

    def spy(hf: Any, hidden: torch.Tensor, ids: torch.Tensor, heads: Any) -> torch.Tensor:
        lengths.append(ids.shape[1])
        return weights(hf, hidden, ids, heads)

    monkeypatch.setattr(whisper_align, "alignment_weights", spy)
    options = DecodeOptions(word_timestamps=True)
    tasks = [audio_window(english, s, secs, options) for s, secs in ((1, 3.0), (2, 7.5), (3, 1.2))]
    want = [english.run_batch([t])[0] for t in tasks]
    assert all(len(w.words) >= 3 for w in want)  # enough words to compare times
    counting = CountingGenerate(english.model)
    engine = ContinuousEngine(english, worker, EngineConfig(max_active=4))
    engine.start()
    got = await asyncio.wait_for(engine.submit_many(tasks), 60)
    for result, expected in zip(got, want, strict=True):
        assert_same_words(result.value, expected)
    assert counting.calls == 0 and engine.stats().fallback_windows == 0
    assert lengths and all(t <= 4 or t & (t - 1) == 0 for t in lengths), lengths
    await engine.stop()


async def test_language_detection_of_the_real_model_matches_generate(
    multilingual: WhisperModel, worker
) -> None:
    tasks = [audio_window(multilingual, s, 2.0, DecodeOptions()) for s in range(4)]
    want = [multilingual.run_batch([t])[0] for t in tasks]
    counting = CountingGenerate(multilingual.model)
    engine = ContinuousEngine(multilingual, worker, EngineConfig(max_active=4))
    engine.start()
    got = await asyncio.wait_for(engine.submit_many(tasks), 60)
    assert [(r.value.language, r.value.text) for r in got] == [(w.language, w.text) for w in want]
    assert counting.calls == 0
    await engine.stop()


# -- a fallback's bounded share -----------------------------------------------------------------
class GatedFallback(TinyWhisper):
    """A fallback that can't finish until the neighbour's request has completed: it deadlocks
    (and fails) if the engine waits for it before stepping anything else."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.neighbour_done = threading.Event()
        self.pauses = 0

    def run_batch(self, tasks: list[WindowTask]) -> list[WindowResult]:
        self.entered.set()
        assert self.neighbour_done.wait(5), "the neighbour was held by the fallback"
        return super().run_batch(tasks)

    def run_batch_yielding(self, tasks: list[WindowTask], pause: Any) -> list[WindowResult]:
        self.entered.set()
        for _ in range(100_000):  # tokens of a long beam search, each followed by a pause
            pause()
            self.pauses += 1
            if self.neighbour_done.wait(0.001):
                return super().run_batch(tasks)
        raise AssertionError("the neighbour never finished")


async def test_a_neighbour_is_not_held_by_a_fallback(worker) -> None:
    model = GatedFallback()
    engine = ContinuousEngine(model, worker, EngineConfig(max_active=4))
    engine.start()
    slow = asyncio.ensure_future(
        engine.submit(WindowTask(windows(1, 9)[0], 1.0, DecodeOptions(beam_size=5)))
    )
    assert await asyncio.to_thread(model.entered.wait, 10)
    feats = windows(1, seed=4)[0]
    neighbour = await asyncio.wait_for(engine.submit(WindowTask(feats, 1.0)), 30)
    model.neighbour_done.set()
    assert_same(neighbour.value, reference(model, feats, DecodeOptions()))
    assert (await asyncio.wait_for(slow, 30)).value.text == "fallback"
    assert engine.stats().fallback_windows == 1
    await engine.stop()


def test_the_fallback_share_is_bounded() -> None:
    with pytest.raises(ValueError, match="max_fallback_share"):
        EngineConfig(max_fallback_share=0)


def test_generate_pauses_between_tokens_and_gives_the_same_result(english: WhisperModel) -> None:
    """Beam search with pauses: the pause runs after every step, and changes nothing."""
    tasks = [audio_window(english, s, 2.0, DecodeOptions(beam_size=3)) for s in (1, 2)]
    plain = english.run_batch(tasks)
    pauses: list[int] = []
    shared = english.run_batch_yielding(tasks, lambda: pauses.append(1))
    assert shared == plain
    longest = max(len(r.tokens) for r in plain)
    assert len(pauses) >= longest  # one per beam step at least


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (3, 7), (40, 300), (25, 25)])
@pytest.mark.parametrize("ties", [False, True])
def test_dynamic_time_warping_takes_transformers_path(shape: tuple[int, int], ties: bool) -> None:
    """The numpy wavefront gives transformers' path exactly, ties (rounded costs) included."""
    from transformers.models.whisper.generation_whisper import _dynamic_time_warping

    matrix = np.random.default_rng(sum(shape)).standard_normal(shape)
    if ties:
        matrix = np.round(matrix)
    want = _dynamic_time_warping(matrix)
    got = dynamic_time_warping(matrix)
    assert [list(a) for a in got] == [list(b) for b in want]


@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 5, 4), (6, 9, 750), (1, 3, 4, 40)])
@pytest.mark.parametrize("width", [1, 7, 9])
def test_median_filter_is_transformers(shape: tuple[int, ...], width: int) -> None:
    """Ours, not transformers' private helper (gone in a release, the word times would go
    with it): the same values, short inputs and ties included."""
    from transformers.models.whisper.generation_whisper import _median_filter

    x = torch.from_numpy(np.random.default_rng(width).standard_normal(shape)).float()
    for inputs in (x, x.round()):
        assert torch.equal(median_filter(inputs, width), _median_filter(inputs, width))
    with pytest.raises(ValueError, match="odd"):
        median_filter(x, 4)
