"""Low precision, tested on the CPU: bfloat16 (the same code as on a GPU, other kernels) and
float16 (CPU kernels exist for the small model's ops, so fp16-only mistakes show up too).

- The continuous engine gives the tokens of `generate` run in the same dtype, alone and with
  windows joining mid-decode, on the tiny random Whisper whose logits are far apart.
- The real `WhisperModel` (random weights, tiny.en's tokenizer) runs every path in each dtype
  under the device guard: features are cast on the way in, and the probabilities it reports
  (no-speech, confidence, word probabilities) are computed in fp32, so they stay in [0, 1].
- `--dtype auto` picks bf16 only on CPUs with native bf16 matrix instructions.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from server.batching.continuous import ContinuousEngine, EngineConfig
from server.batching.micro import BatcherConfig, MicroBatcher
from server.models import attention
from server.models.base import DecodeOptions, WindowResult, WindowTask
from server.models.device import _cpuinfo_bf16_flag, choose_dtype
from tests.device_guard import GuardedExecutor
from tests.unit.test_continuous import EOS, NO_SPEECH, SOT, TinyWhisper, task, windows
from tests.unit.test_placement import audio, load

LOW = [torch.bfloat16, torch.float16]


def tiny(dtype: torch.dtype, **kwargs: Any) -> TinyWhisper:
    model = TinyWhisper(**kwargs)
    model.model = model.model.to(dtype)
    model.info = model.info.__class__(
        "tiny-random", False, "cpu", "cpu", str(dtype).removeprefix("torch."), ("en",)
    )
    return model


@torch.inference_mode()
def generate_tokens(model: TinyWhisper, features: np.ndarray) -> tuple[list[int], float]:
    """Greedy `generate` in the model's dtype: tokens, and the no-speech probability."""
    hf = model.model
    dtype = next(hf.parameters()).dtype
    encoded = hf.get_encoder()(torch.from_numpy(features)[None].to(dtype))
    out = hf.generate(
        encoder_outputs=encoded, max_new_tokens=model.max_new_tokens,
        return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    n_new = len(out["scores"])
    tokens = out["sequences"][0, -n_new:].tolist()
    tokens = tokens[: tokens.index(EOS)] if EOS in tokens else tokens
    logits = hf(encoder_outputs=encoded, decoder_input_ids=torch.tensor([[SOT]])).logits
    return tokens, float(torch.softmax(logits[0, 0].float(), -1)[NO_SPEECH])


@pytest.fixture
def worker():
    pool = ThreadPoolExecutor(1, thread_name_prefix="model-worker")
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


@pytest.mark.parametrize("dtype", LOW, ids=str)
async def test_continuous_engine_gives_generate_tokens_in_low_precision(
    worker, dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine's bookkeeping against `generate`'s exact tokens: both attend through SDPA
    # (the plain low-precision attention is checked against SDPA below).
    monkeypatch.setattr(attention, "PLAIN_LOW_PRECISION_ON_CPU", False)
    model = tiny(dtype)
    feats = windows(8, seed=31)
    engine = ContinuousEngine(model, worker, EngineConfig(max_active=4, max_batch_size=2))
    engine.start()
    # 8 windows through 4 slots in encoder batches of 2: joins and leaves mid-decode.
    results = await asyncio.wait_for(engine.submit_many([task(f) for f in feats]), 120)
    lengths = set()
    for got, features in zip(results, feats, strict=True):
        tokens, no_speech = generate_tokens(model, features)
        assert list(got.value.tokens) == tokens
        assert got.value.no_speech_prob == pytest.approx(no_speech, abs=2e-2)
        assert 0 < got.value.confidence <= 1
        lengths.add(len(tokens))
    assert len(lengths) > 1 and engine.stats().decode_steps > 0
    await engine.stop()


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_eager_low_precision_steps_attend_over_blocks_of_the_cache(
    dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With plain products (low precision on a CPU) each new key length would build and keep a
    oneDNN kernel: eager steps attend over 64, 128... positions, and decode the same tokens as
    steps over exactly the filled positions."""
    from server.models import whisper_step
    from server.models.whisper_step import GreedyRuntime
    from tests.unit.test_continuous import decode_alone

    model = tiny(dtype, suppress_eos=True, max_new_tokens=70)  # past one block of 64
    feats = windows(1, seed=9)[0]
    with monkeypatch.context() as exactly:
        exactly.setattr(whisper_step, "padded_keys", lambda filled, _: filled)
        exact = decode_alone(GreedyRuntime(model, 2), feats, DecodeOptions()).tokens
    keys: set[int] = set()

    def spy(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any = None) -> Any:
        keys.add(key.shape[-2])
        return attention.attend(q, key, value, mask)

    monkeypatch.setattr(whisper_step, "attend", spy)
    blocked = decode_alone(GreedyRuntime(model, 2), feats, DecodeOptions()).tokens
    assert len(exact) == 70 and blocked == exact
    assert keys == {64, 128, 30}  # self-attention in two blocks; cross-attention: 30 frames


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
async def test_every_whisper_path_runs_in_low_precision(
    tiny_en_dir: Path, tmp_path: Path, dtype: str
) -> None:
    model = load(tiny_en_dir, tmp_path / "random", dtype=dtype)
    assert str(model.model.dtype).endswith(dtype)
    pool = GuardedExecutor()
    engine = ContinuousEngine(model, pool, EngineConfig(max_active=4))
    engine.start()
    feats = [model.prepare(audio(seed)) for seed in (1, 2)]
    plain = await asyncio.wait_for(engine.submit(WindowTask(feats[0], 1.0)), 120)
    drafted = WindowTask(feats[0], 1.0, DecodeOptions(draft=plain.value.tokens[:3]))
    options = [
        DecodeOptions(),
        DecodeOptions(beam_size=2),
        DecodeOptions(prompt="some words"),
        DecodeOptions(word_timestamps=True),
    ]
    results = await asyncio.wait_for(
        engine.submit_many([drafted, *(WindowTask(feats[1], 1.0, o) for o in options)]), 120
    )
    assert results[0].value.tokens == plain.value.tokens  # a right draft changes nothing
    for r in [plain, *results]:
        check_probabilities(r.value)
    assert results[-1].value.words
    await engine.stop()
    batcher: MicroBatcher[Any, Any] = MicroBatcher(model.run_batch, pool, BatcherConfig(2, 0))
    batcher.start()
    generated = await asyncio.wait_for(
        batcher.submit_many([WindowTask(f, 1.0) for f in feats]), 120
    )
    for r in generated:
        check_probabilities(r.value)
    await batcher.stop()
    pool.shutdown(wait=False)


def check_probabilities(result: WindowResult) -> None:
    assert 0 <= result.no_speech_prob <= 1 and np.isfinite(result.no_speech_prob)
    assert 0 <= result.confidence <= 1 and np.isfinite(result.confidence)
    assert all(0 <= w.probability <= 1 for w in result.words)


def test_auto_dtype_follows_the_device_and_the_cpu() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_dtype("auto", cuda).dtype == torch.float16
    chosen = choose_dtype("auto", cpu, "amx_bf16")
    assert chosen.dtype == torch.bfloat16 and "amx_bf16" in chosen.reason
    assert choose_dtype("auto", cpu, "avx512_bf16").dtype == torch.bfloat16
    plain = choose_dtype("auto", cpu, None)
    assert plain.dtype == torch.float32 and "no native bf16" in plain.reason
    assert choose_dtype("bfloat16", cpu, None).reason == "--dtype bfloat16"
    assert choose_dtype("float32", cuda).dtype == torch.float32


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n")
    assert _cpuinfo_bf16_flag(info) == "avx512_bf16"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n")
    assert _cpuinfo_bf16_flag(info) == "amx_bf16"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert _cpuinfo_bf16_flag(info) is None
    assert _cpuinfo_bf16_flag(tmp_path / "missing") is None


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("queries", [1, 5])
def test_plain_low_precision_attention_agrees_with_sdpa(dtype, queries) -> None:
    gen = torch.Generator(device="cpu").manual_seed(7)
    q = torch.randn(3, 6, queries, 64, generator=gen, device="cpu").to(dtype) * 64**-0.5
    k = torch.randn(3, 6, 1500, 64, generator=gen, device="cpu").to(dtype)
    v = torch.randn(3, 6, 1500, 64, generator=gen, device="cpu").to(dtype)
    mask = torch.arange(1500, device="cpu").view(1, 1, 1, -1) < torch.tensor(
        [1500, 40, 1], device="cpu"
    ).view(3, 1, 1, 1)  # a full row, a short one, one valid key (never NaN)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), mask, scale=1.0)
    for m in (None, mask):
        plain = attention.attend(q, k, v, m)
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), m, scale=1.0)
        fused = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=1.0)
        assert plain.dtype == dtype and not plain.isnan().any()
        # Within the format's rounding of the output (8 bits of mantissa in bf16), like the
        # fused kernel, whose inputs are just as rounded.
        bound = 2**-7 * float(want.abs().max())
        assert float((plain.float() - want).abs().max()) <= bound
        assert float((fused.float() - want).abs().max()) <= bound
    assert torch.allclose(attention.attend(q, k, v, mask).float(), exact, atol=2e-2)
