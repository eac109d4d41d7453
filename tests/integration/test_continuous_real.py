"""The continuous engine with real tiny.en weights on real speech: one window alone gives
exactly the tokens of transformers' `generate` (greedy), and 16 concurrent submitters get the
transcripts of sequential calls for >= 98% of the files, with a WER no worse."""

from __future__ import annotations

import asyncio
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import soundfile as sf
import torch

from loadgen.wer import word_error_rate
from server.batching.continuous import ContinuousEngine, EngineConfig
from server.models.base import DecodeOptions, WindowResult, WindowTask
from server.models.whisper_step import GreedyRuntime
from tests.conftest import librispeech_items, require_data


@dataclass(frozen=True)
class File:
    uid: str
    transcript: str  # LibriSpeech's
    task: WindowTask
    tokens: list[int]  # what generate gives, without end-of-text
    result: WindowResult  # text, confidence and no-speech probability, as WhisperModel has them


def _files() -> list[tuple[str, Any, str]]:
    require_data()
    return librispeech_items("test-clean")[:7] + librispeech_items("test-other")[:10]


@pytest.fixture(scope="module")
def files(real_model: Any) -> list[File]:
    return [_reference(real_model, *item) for item in _files()]


@torch.inference_mode()
def _reference(model: Any, uid: str, path: Any, transcript: str) -> File:
    """Greedy `generate` on one window, and the result fields as WhisperModel derives them."""
    samples, _ = sf.read(path, dtype="float32")
    task = WindowTask(model.prepare(samples), len(samples) / 16_000)
    hf = model.model
    eos = hf.generation_config.eos_token_id
    encoded = hf.get_encoder()(torch.from_numpy(task.features)[None])
    out = hf.generate(
        encoder_outputs=encoded, max_new_tokens=model.max_new_tokens,
        return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    n_new = len(out["scores"])
    new = out["sequences"][0, -n_new:].tolist()
    tokens = new[: new.index(eos)] if eos in new else new
    logp = torch.log_softmax(torch.stack(out["scores"], 1)[0].float(), -1)
    picked = logp.gather(1, torch.as_tensor(new)[:, None])[: len(tokens), 0]
    sot = torch.tensor([[hf.generation_config.decoder_start_token_id]])
    logits = hf(encoder_outputs=encoded, decoder_input_ids=sot).logits[0, 0]
    no_speech_id = model.tokenizer.convert_tokens_to_ids("<|nocaptions|>")
    result = WindowResult(
        model.tokenizer.decode(tokens, skip_special_tokens=True).strip(), "en",
        float(picked.mean().exp()), float(torch.softmax(logits.float(), -1)[no_speech_id]),
    )  # fmt: skip
    return File(uid, transcript, task, tokens, result)


def test_one_window_alone_gives_exactly_the_tokens_of_generate(real_model, files) -> None:
    runtime = GreedyRuntime(real_model, max_active=1)
    prompt = runtime.prompt(DecodeOptions())
    assert prompt == [50257, 50362]  # tiny.en: <|startoftranscript|> <|notimestamps|>
    for f in files:
        (seq,) = runtime.join([f.task.features], [prompt], [f.uid])
        while not seq.finished:
            runtime.step()
        runtime.leave([seq])
        assert seq.tokens == f.tokens, f.uid
        got = runtime.result(seq)
        assert got.text == f.result.text
        assert got.confidence == pytest.approx(f.result.confidence, abs=1e-4)
        assert got.no_speech_prob == pytest.approx(f.result.no_speech_prob, abs=1e-4)


async def test_sixteen_concurrent_submitters_match_sequential_calls(real_model, files) -> None:
    worker = ThreadPoolExecutor(1, thread_name_prefix="model-worker")
    engine = ContinuousEngine(real_model, worker, EngineConfig(max_active=16, max_batch_size=8))
    engine.start()
    cursor = iter(range(len(files)))
    texts: dict[int, str] = {}

    async def submitter() -> None:
        while (i := next(cursor, None)) is not None:
            texts[i] = (await engine.submit(files[i].task)).value.text

    try:
        await asyncio.wait_for(asyncio.gather(*(submitter() for _ in range(16))), 300)
    finally:
        await engine.stop()
        worker.shutdown(wait=False)
    got = [texts[i] for i in range(len(files))]
    sequential = [f.result.text for f in files]
    same = sum(a == b for a, b in zip(got, sequential, strict=True))
    assert same >= math.ceil(0.98 * len(files)), list(zip(got, sequential, strict=True))
    references = [f.transcript for f in files]
    assert word_error_rate(references, got) <= word_error_rate(references, sequential) + 1e-9
    assert engine.stats().step_rows / engine.stats().decode_steps > 2  # it did batch the steps


def test_both_engines_behind_the_grpc_server_agree_and_export_metrics(real_settings, real_model):
    """The default (continuous) server and `--engine generate` give the same transcripts over
    gRPC for 8 concurrent clients; beam search still goes through generate (fallback); the
    engine's decode counters reach the metrics registry."""
    from concurrent.futures import ThreadPoolExecutor as Pool

    from prometheus_client import generate_latest

    from asr.v1 import asr_pb2
    from server.embedded import EmbeddedServer

    items = _files()[:8]
    texts: dict[str, list[str]] = {}
    for engine in ("continuous", "generate"):
        server = EmbeddedServer(real_settings.replace(engine=engine), real_model).start()
        try:
            stub = server.stub()

            def call(path: Any, beam: int = 1, stub: Any = stub) -> str:
                config = asr_pb2.RecognitionConfig(beam_size=beam)
                audio = asr_pb2.RecognitionAudio(content=path.read_bytes())
                response = stub.Recognize(asr_pb2.RecognizeRequest(config=config, audio=audio))
                return " ".join(r.alternatives[0].transcript for r in response.results)

            with Pool(8) as pool:
                texts[engine] = list(pool.map(call, [path for _, path, _ in items]))
            beam_text = call(items[0][1], beam=2)
            assert beam_text
            assert server.handle is not None
            exported = generate_latest(server.handle.metrics.registry).decode()
        finally:
            server.stop()
        if engine == "continuous":
            steps = float(re.search(r"^asr_decode_steps_total (\S+)$", exported, re.M)[1])
            fallback = re.search(r"^asr_decode_fallback_windows_total (\S+)$", exported, re.M)
            assert steps > 0 and float(fallback[1]) == 1.0  # the beam-search request
        else:
            assert "asr_decode_steps_total" not in exported
    same = sum(a == b for a, b in zip(texts["continuous"], texts["generate"], strict=True))
    assert same >= math.ceil(0.98 * len(items)), texts


def test_drafts_save_steps_and_leave_the_tokens_of_generate(real_model, files) -> None:
    """Real speech: a right draft (the transcript's tokens) or a half-wrong one (the first
    half, then other words) gives exactly the tokens of generate, and a right draft needs no
    step beyond the end-of-text check."""
    runtime = GreedyRuntime(real_model, max_active=2)
    prompt = runtime.prompt(DecodeOptions())
    assert prompt is not None
    other = real_model.tokenizer.encode(" banana telescope", add_special_tokens=False)
    for f in files:
        right = tuple(f.tokens)
        wrong = (*f.tokens[: len(f.tokens) // 2], *other)
        for draft in (right, wrong):
            tokens = runtime.draft(DecodeOptions(draft=draft))
            (seq,) = runtime.join([f.task.features], [prompt], [f.uid], [tokens])
            steps = 0
            while not seq.finished:
                runtime.step()
                steps += 1
            runtime.leave([seq])
            assert seq.tokens == f.tokens, (f.uid, draft)
            if draft == right:
                assert steps <= 1
