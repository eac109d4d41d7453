"""The static-shape decode step (`server.models.static_step`): row buckets, the `compile`
choice and its reasons, and, on the random-weight Whisper, the compiled step giving the eager
step's tokens with sequences joining and leaving mid-decode, compiled once per bucket (never
per token, never past dynamo's recompile limit into silent eager)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from server.batching.step_times import StepTimes, rows_bucket
from server.config import Settings, SettingsError
from server.metrics import Metrics
from server.models import static_step
from server.models.base import DecodeOptions
from server.models.static_step import bucket_for, bucket_sizes, choose_step
from server.models.whisper import WhisperModel
from server.models.whisper_step import GreedyRuntime
from tests.random_whisper import make_random_checkpoint

CPU = torch.device("cpu")


def test_rows_are_padded_to_powers_of_two_up_to_max_active() -> None:
    assert bucket_sizes(16) == [1, 2, 4, 8, 16]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]
    assert bucket_sizes(1) == [1]
    assert [bucket_for(n, bucket_sizes(12)) for n in (1, 2, 3, 5, 9, 12)] == [1, 2, 4, 8, 12, 12]


def test_compile_choice_says_what_runs_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_step("off", CPU).label == "eager: --compile off"
    assert choose_step("on", torch.device("cuda")).label == "cuda-graphs"
    assert choose_step("auto", torch.device("cuda")).mode == "cuda-graphs"
    monkeypatch.setattr(static_step, "cpp_compiler_problem", lambda: "no C++ compiler (g++)")
    assert choose_step("auto", CPU).label == "eager: no C++ compiler (g++)"
    assert choose_step("on", CPU).label == "compiled (inductor)"  # on insists
    monkeypatch.setattr(static_step, "cpp_compiler_problem", lambda: None)
    assert choose_step("auto", CPU).label == "compiled (inductor)"
    with pytest.raises(ValueError, match="compile must be one of"):
        choose_step("fast", CPU)


def test_the_compiler_probe_names_a_missing_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(static_step.shutil, "which", lambda _name: None)
    assert "no C++ compiler" in (static_step.cpp_compiler_problem() or "")


def test_compile_setting_is_validated() -> None:
    assert Settings().compile == "auto"
    with pytest.raises(SettingsError, match="compile must be one of"):
        Settings(compile="yes")


def test_step_times_by_rows_and_tokens_per_second() -> None:
    times = StepTimes(window_s=10)
    times.observe(1, 0.002, now=100.0)
    times.observe(7, 0.008, now=101.0)
    times.observe(8, 0.010, now=102.0)
    snap = times.snapshot()
    assert [rows_bucket(n) for n in (1, 2, 3, 7, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert sorted(snap) == [1, 8]
    assert (snap[8].steps, snap[8].rows) == (2, 15)
    assert times.tokens_per_second(now=102.0) == pytest.approx(16 / 0.020)
    assert times.tokens_per_second(now=200.0) == 0.0  # nothing decoded lately
    metrics = Metrics()
    metrics.watch_steps(times)
    count = metrics.registry.get_sample_value("asr_decode_step_seconds_count", {"rows": "8"})
    assert count == 2
    le = metrics.registry.get_sample_value(
        "asr_decode_step_seconds_bucket", {"rows": "1", "le": "0.0025"}
    )
    assert le == 1


@pytest.fixture(scope="module")
def model(tiny_en_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> WhisperModel:
    path = make_random_checkpoint(tiny_en_dir, tmp_path_factory.mktemp("random-compile"))
    return WhisperModel(str(path), "random-tiny", "cpu", "float32", max_new_tokens=24)


def _decode_with_joins_and_leaves(runtime: GreedyRuntime, model: WhisperModel) -> list[list[int]]:
    """Two windows start, a third joins mid-decode, one leaves early (cancelled)."""
    rng = np.random.default_rng(7)
    features = [model.prepare((0.1 * rng.standard_normal(16_000)).astype(np.float32))
                for _ in range(3)]  # fmt: skip
    prompt = runtime.prompt(DecodeOptions())
    assert prompt is not None
    a, b = runtime.join(features[:2], [prompt, prompt], ["a", "b"])
    for _ in range(3):
        runtime.step()
    runtime.leave([b])  # cancelled after 4 tokens: c takes its slot
    (c,) = runtime.join(features[2:], [prompt], ["c"])
    while not (a.finished and c.finished):
        runtime.step()
        runtime.leave([s for s in runtime.active if s.finished])
    return [a.tokens, b.tokens, c.tokens]


@pytest.mark.slow  # inductor runs the C++ compiler
def test_compiled_step_gives_the_eager_tokens_compiling_once_per_bucket(model) -> None:
    from torch._dynamo.utils import counters

    eager = GreedyRuntime(model, max_active=2, compile="off")
    expected = _decode_with_joins_and_leaves(eager, model)
    assert all(expected) and len(expected[0]) > 8  # a real decode, not an instant end
    compiled = GreedyRuntime(model, max_active=2, compile="on")
    # Graphs compiled earlier in this process (another test's runtime over the same code and
    # shapes) would be reused, not counted: start from an empty dynamo cache.
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    compiled.warm_steps()
    assert compiled.runner.warmed == [1, 2]
    assert counters["stats"]["unique_graphs"] - before == 2  # one graph per bucket
    assert _decode_with_joins_and_leaves(compiled, model) == expected
    assert counters["stats"]["unique_graphs"] - before == 2  # no recompile per token


async def test_without_warm_up_nothing_compiles_on_a_request(model) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from torch._dynamo.utils import counters

    from server.batching.continuous import ContinuousEngine, EngineConfig
    from server.models.base import WindowTask

    before = counters["stats"]["unique_graphs"]
    with ThreadPoolExecutor(1) as worker:
        engine = ContinuousEngine(model, worker, EngineConfig(max_active=2, compile="on"))
        engine.start()
        silence = model.prepare(np.zeros(16_000, np.float32))
        result = await engine.submit(WindowTask(silence, 1.0))
        await engine.stop()
    assert result.value.tokens  # decoded, eagerly
    assert counters["stats"]["unique_graphs"] == before
    assert engine.decode_step.startswith("eager: the compiled step is built at warm-up")
    steps = engine.step_times.snapshot()[1]
    assert steps.steps == engine.stats().decode_steps > 0


def test_server_info_says_how_the_decode_step_runs(model) -> None:
    from asr.v1 import asr_pb2
    from server.embedded import EmbeddedServer

    server = EmbeddedServer(Settings(compile="off", warmup=False), model).start()
    try:
        info = server.stub().GetServerInfo(asr_pb2.GetServerInfoRequest(), timeout=30)
    finally:
        server.stop()
    assert (info.engine, info.decode_step) == ("continuous", "eager: --compile off")
