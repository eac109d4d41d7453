"""On a CUDA device: the decode step captured as CUDA graphs (`--compile auto|on` on CUDA)
gives the eager step's tokens with joins, leaves, drafts and cancellation mid-decode, and an
out-of-memory step is retried in eager pieces (skipped without CUDA; run by
`scripts/gpu_check.sh` with the other GPU tests)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from server.batching.continuous import ContinuousEngine, EngineConfig
from server.models.base import DecodeOptions, WindowTask
from server.models.whisper_step import GreedyRuntime
from tests.gpu import test_gpu as base
from tests.gpu.test_gpu import model_in, tasks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return base.checkpoint.__wrapped__(tmp_path_factory)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def clips() -> Any:
    return base.clips.__wrapped__()  # type: ignore[attr-defined]


def decode(model: Any, windows: list[WindowTask], compile: str, **hooks: Any) -> list[Any]:
    """All windows through a fresh engine (8 slots, joins of 3: joins mid-decode); the first
    is cancelled after its first token when `cancel` is set; `fault` wraps the runtime."""

    async def main() -> list[Any]:
        with ThreadPoolExecutor(1) as worker:
            engine = ContinuousEngine(
                model, worker, EngineConfig(max_active=8, max_batch_size=3, compile=compile)
            )
            engine.start()
            await engine.warmup([1])
            if "fault" in hooks:
                hooks["fault"](engine.runtime)
            try:
                futures = engine.enqueue(windows)
                if hooks.get("cancel"):
                    futures[0].cancel()
                done = await asyncio.gather(*futures, return_exceptions=True)
                return [d if isinstance(d, BaseException) else d.value for d in done]
            finally:
                await engine.stop()

    return asyncio.run(main())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_graphs_give_the_eager_tokens_with_joins_leaves_and_drafts(checkpoint, clips, dtype):
    model = model_in(checkpoint, dtype)
    windows = tasks(model, clips[:12])
    eager = decode(model, windows, "off")
    # A draft for every other window: half its eager tokens (kept), then a wrong one.
    drafts = [(*e.tokens[: len(e.tokens) // 2], 0) for e in eager]
    drafted = [
        WindowTask(w.features, w.duration_s, DecodeOptions(draft=d)) if i % 2 else w
        for i, (w, d) in enumerate(zip(windows, drafts, strict=True))
    ]
    for got in (decode(model, windows, "on"), decode(model, drafted, "on")):
        assert [g.tokens for g in got] == [e.tokens for e in eager]


def test_the_runtime_captures_one_graph_per_bucket(checkpoint) -> None:
    model = model_in(checkpoint, "float16")
    runtime = GreedyRuntime(model, max_active=8, compile="auto")
    assert runtime.step_choice.label == "cuda-graphs"
    runtime.warm_steps()
    assert runtime.runner.warmed == [1, 2, 4, 8]


def test_cancelling_mid_decode_leaves_the_others_unchanged(checkpoint, clips) -> None:
    model = model_in(checkpoint, "float16")
    windows = tasks(model, clips[:6])
    eager = decode(model, windows, "off")
    got = decode(model, windows, "on", cancel=True)
    assert isinstance(got[0], asyncio.CancelledError)
    assert [g.tokens for g in got[1:]] == [e.tokens for e in eager[1:]]


def test_an_out_of_memory_step_is_retried_in_eager_pieces(checkpoint, clips) -> None:
    model = model_in(checkpoint, "float16")
    windows = tasks(model, clips[:6])
    eager = decode(model, windows, "off")
    faults: list[int] = []

    def fault(runtime: GreedyRuntime) -> None:
        real = runtime.runner.run

        def run(ids: list[int], positions: list[int]) -> Any:
            if len(ids) > 1 and not faults:
                faults.append(len(ids))
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return real(ids, positions)

        runtime.runner.run = run  # type: ignore[method-assign]

    got = decode(model, windows, "on", fault=fault)
    assert faults, "the injected out-of-memory never ran"
    assert [g.tokens for g in got] == [e.tokens for e in eager]
