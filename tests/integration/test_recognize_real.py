"""Recognize through a real server on loopback with real tiny.en weights and real speech."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import soundfile as sf

from asr.v1 import asr_pb2
from loadgen.wer import word_error_rate
from tests.conftest import JFK_FLAC, JFK_WAV, librispeech_items, require_data

Config = asr_pb2.RecognitionConfig
JFK_TEXT = (
    "and so my fellow americans ask not what your country can do for you "
    "ask what you can do for your country"
)

# Measured here with tiny.en (greedy, fp32): about 4% on test-clean, 14% on test-other.
WER_BOUND = {"test-clean": 0.08, "test-other": 0.18}


def request(content: bytes, **config) -> asr_pb2.RecognizeRequest:
    return asr_pb2.RecognizeRequest(
        config=Config(**config), audio=asr_pb2.RecognitionAudio(content=content)
    )


def transcript(response: asr_pb2.RecognizeResponse) -> str:
    return " ".join(r.alternatives[0].transcript for r in response.results)


def transcribe_all(server, paths, concurrency: int = 8) -> list[asr_pb2.RecognizeResponse]:
    stub = server.stub()
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda p: stub.Recognize(request(p.read_bytes()), timeout=600), paths))


@pytest.mark.parametrize("split", ["test-clean", "test-other"])
def test_librispeech_word_error_rate(real_server, split):
    require_data()
    items = librispeech_items(split)
    assert items, f"no {split} files"
    responses = transcribe_all(real_server, [path for _, path, _ in items])
    wer = word_error_rate([ref for _, _, ref in items], [transcript(r) for r in responses])
    print(f"{split}: {len(items)} files, WER {wer:.3f}")
    assert wer < WER_BOUND[split]
    # Concurrent requests really shared model calls.
    assert max(r.timing.batch_size for r in responses) > 1
    assert all(r.timing.queue_time.ToNanoseconds() >= 0 for r in responses)


def test_jfk_44k_stereo_24bit_flac(real_server):
    require_data()
    response = real_server.stub().Recognize(request(JFK_FLAC.read_bytes()), timeout=120)
    assert word_error_rate([JFK_TEXT], [transcript(response)]) < 0.05
    assert response.results[0].language_code == "en"
    assert 0.5 < response.results[0].alternatives[0].confidence <= 1.0
    assert abs(response.timing.audio_duration.ToMilliseconds() - 11_000) < 50


@pytest.mark.parametrize("rate", [16_000, 8_000])
def test_raw_linear16(real_server, rate):
    require_data()
    samples, _ = sf.read(JFK_WAV, dtype="int16")
    if rate != 16_000:
        samples = samples[:: 16_000 // rate]  # crude, but only to make 8 kHz test input
    content = samples.astype("<i2").tobytes()
    response = real_server.stub().Recognize(
        request(content, encoding=Config.LINEAR16, sample_rate_hertz=rate), timeout=120
    )
    assert word_error_rate([JFK_TEXT], [transcript(response)]) < 0.15


def test_long_audio_is_windowed_and_stitched_in_order(real_server):
    require_data()
    items = sorted(librispeech_items("test-other"), key=lambda i: -sf.info(i[1]).duration)[:4]
    audio = np.concatenate([sf.read(path, dtype="float32")[0] for _, path, _ in items])
    assert len(audio) > 16_000 * 45
    buf = io.BytesIO()
    sf.write(buf, audio, 16_000, format="FLAC")
    response = real_server.stub().Recognize(request(buf.getvalue()), timeout=300)
    assert response.timing.windows >= 2
    assert response.timing.batch_size >= 2  # the windows of one request ran in one batch
    starts = [r.result_start_time.ToMilliseconds() for r in response.results]
    assert starts == sorted(starts)
    assert word_error_rate([" ".join(ref for *_, ref in items)], [transcript(response)]) < 0.25


def test_word_time_offsets_are_monotonic_and_inside_the_audio(real_server):
    require_data()
    response = real_server.stub().Recognize(
        request(JFK_WAV.read_bytes(), enable_word_time_offsets=True), timeout=120
    )
    words = response.results[0].alternatives[0].words
    first = [w.word.strip(",.").lower() for w in words][:5]
    assert first == ["and", "so", "my", "fellow", "americans"]
    starts = [w.start_time.ToMilliseconds() for w in words]
    ends = [w.end_time.ToMilliseconds() for w in words]
    assert starts == sorted(starts)
    assert all(s <= e <= 11_000 for s, e in zip(starts, ends, strict=True))
    # "country" (the last word) is spoken at about 10.2-10.7 s in this clip.
    assert 9_500 <= starts[-1] <= 11_000


def test_bad_input_then_good_input(real_server):
    stub = real_server.stub()
    with pytest.raises(grpc.RpcError) as info:
        stub.Recognize(request(b"RIFF\x00\x00\x00\x00WAVEfmt "), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    require_data()
    assert "country" in transcript(stub.Recognize(request(JFK_WAV.read_bytes()), timeout=120))


def test_server_info_describes_the_real_model(real_server):
    info = real_server.stub().GetServerInfo(asr_pb2.GetServerInfoRequest(), timeout=10)
    assert info.model_id == "tiny.en" and not info.multilingual
    assert info.device == "cpu" and info.dtype == "float32"
    assert list(info.languages) == ["en"]
    assert (info.engine, info.max_active) == ("continuous", 16)
