"""Hostile and unlucky clients against real tiny.en weights on loopback (issue 14)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from asr.v1 import asr_pb2
from loadgen.wer import word_error_rate
from tests.conftest import JFK_FLAC, require_data, wav_bytes

Config = asr_pb2.RecognitionConfig
JFK_TEXT = (
    "and so my fellow americans ask not what your country can do for you "
    "ask what you can do for your country"
)
LONG_PROMPT = (
    "A speech given at the inauguration of the thirty-fifth president of the United States, "
    "in Washington, on a cold January day in nineteen sixty-one, before a large crowd."
)


def request(content: bytes, **config) -> asr_pb2.RecognizeRequest:
    return asr_pb2.RecognizeRequest(
        config=Config(**config), audio=asr_pb2.RecognitionAudio(content=content)
    )


def transcript(response: asr_pb2.RecognizeResponse) -> str:
    return " ".join(r.alternatives[0].transcript for r in response.results)


def test_a_long_prompt_works_and_its_batch_neighbours_are_unaffected(real_server):
    """A prompt of 6+ words used to exceed the 448-token context with the 440-token decode
    budget: generate raised, and every request of its fallback batch got INTERNAL."""
    require_data()
    jfk = JFK_FLAC.read_bytes()
    stub = real_server.stub()
    configs = [
        {"initial_prompt": LONG_PROMPT},
        {},
        {"beam_size": 2},
        {"initial_prompt": "Kennedy."},
        {"initial_prompt": "word " * 200},  # 200 tokens: within the 223 allowed
    ]
    calls = [stub.Recognize.future(request(jfk, **c), timeout=600) for c in configs]
    for config, call in zip(configs, calls, strict=True):
        text = transcript(call.result())
        assert word_error_rate([JFK_TEXT], [text]) < 0.2, (config, text)


def test_a_prompt_over_the_token_limit_is_invalid(real_server):
    require_data()
    stub = real_server.stub()
    with pytest.raises(grpc.RpcError) as info:
        stub.Recognize(request(JFK_FLAC.read_bytes(), initial_prompt="x y " * 300), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "223 tokens" in info.value.details()


def test_non_finite_audio_is_refused_at_once(real_server):
    samples = np.full(16_000, np.nan, dtype=np.float32)
    with pytest.raises(grpc.RpcError) as info:
        real_server.stub().Recognize(request(wav_bytes(samples, 16_000, "FLOAT")), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_full_scale_garbage_decodes_a_bounded_number_of_tokens(real_server):
    """1e38 floats used to run the decoder to its 440-token limit: now clipped, and a loop is
    stopped where it starts."""
    rng = np.random.default_rng(0)
    samples = np.where(rng.random(16_000 * 10) < 0.5, -1e38, 1e38).astype(np.float32)
    response = real_server.stub().Recognize(
        request(wav_bytes(samples, 16_000, "FLOAT")), timeout=600
    )
    for result in response.results:
        assert len(result.alternatives[0].transcript.split()) < 60
