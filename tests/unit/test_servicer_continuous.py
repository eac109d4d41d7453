"""The default engine behind a real gRPC server on loopback, fast: a random-weight Whisper
(the real `WhisperModel`, tiny.en's tokenizer) served with `--engine continuous`. Unary and
streaming calls, drafts, a deadline passing mid-decode, UNAVAILABLE while loading and while
draining, and one client's failure leaving the others served."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from asr.v1 import asr_pb2, asr_pb2_grpc
from server.app import build_server
from server.config import Settings
from server.embedded import EmbeddedServer
from tests.conftest import wav_bytes
from tests.unit.test_placement import HoldFirstStep, load

SETTINGS = Settings(
    engine="continuous", max_active=8, max_batch_size=4, warmup=False,
    no_speech_threshold=1.0, silence_dbfs=-200.0,  # random weights: keep every window
)  # fmt: skip


@pytest.fixture(scope="module")
def model(tiny_en_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    m = load(tiny_en_dir, tmp_path_factory.mktemp("random"))
    m.max_new_tokens = 24
    return m


@pytest.fixture
def served(model):
    server = EmbeddedServer(SETTINGS, model).start()
    yield server
    server.stop()


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(16_000 * seconds))).astype(np.float32)


def request(seconds: float = 2.0, seed: int = 0) -> asr_pb2.RecognizeRequest:
    audio = asr_pb2.RecognitionAudio(content=wav_bytes(noise(seconds, seed), 16_000))
    return asr_pb2.RecognizeRequest(audio=audio)


def stream_finals(stub: asr_pb2_grpc.SpeechStub, samples: np.ndarray) -> list:
    """The final results of `samples` sent as a live stream in 100 ms chunks, with interims."""
    pcm = (samples * 32767).astype("<i2").tobytes()
    config = asr_pb2.RecognitionConfig(
        encoding=asr_pb2.RecognitionConfig.LINEAR16, sample_rate_hertz=16_000
    )
    streaming = asr_pb2.StreamingRecognitionConfig(
        config=config, interim_results=True, interim_interval_ms=500
    )

    def chunks():
        yield asr_pb2.StreamingRecognizeRequest(streaming_config=streaming)
        for i in range(0, len(pcm), 3200):
            yield asr_pb2.StreamingRecognizeRequest(audio_content=pcm[i : i + 3200])

    responses = list(stub.StreamingRecognize(chunks(), timeout=120))
    return [r for resp in responses for r in resp.results if r.is_final]


def test_the_default_engine_serves_unary_calls(served) -> None:
    stub = served.stub()
    info = stub.GetServerInfo(asr_pb2.GetServerInfoRequest(), timeout=30)
    assert (info.engine, info.max_active) == ("continuous", 8)
    first = stub.Recognize(request(seed=1), timeout=60)
    again = stub.Recognize(request(seed=1), timeout=60)
    assert first.results[0].alternatives[0].transcript  # random weights still give tokens
    assert first.results == again.results  # greedy: the same audio, the same transcript
    assert served.handle is not None and served.handle.batcher is not None
    stats = served.handle.batcher.stats()
    assert stats is not None and stats.decode_steps > 0


def test_streams_reuse_their_interims_as_drafts(served) -> None:
    """Interim re-decodes pass their last tokens as a draft to the next decode (verified, not
    forced): the final equals a unary call on the same audio."""
    stub = served.stub()
    samples = noise(3.0, seed=2)
    finals = stream_finals(stub, samples)
    unary = stub.Recognize(
        asr_pb2.RecognizeRequest(
            audio=asr_pb2.RecognitionAudio(content=wav_bytes(samples, 16_000))
        ),
        timeout=60,
    )
    assert finals and " ".join(f.alternatives[0].transcript for f in finals) == " ".join(
        r.alternatives[0].transcript for r in unary.results
    )


def test_a_stream_final_is_the_unary_result_of_the_same_audio(served) -> None:
    """Silence before the speech and a pause of 0.9 s inside it, sent live with interims
    (drafts): one final, equal to Recognize of the same samples. Before, the lead-in was
    trimmed and the pause ended an utterance, so the model heard different audio."""
    stub = served.stub()
    samples = np.concatenate(
        [np.zeros(24_000, np.float32), noise(1.0, seed=5), np.zeros(14_400, np.float32),
         noise(1.0, seed=6)]
    )  # fmt: skip
    finals = stream_finals(stub, samples)
    audio = asr_pb2.RecognitionAudio(content=wav_bytes(samples, 16_000))
    unary = stub.Recognize(asr_pb2.RecognizeRequest(audio=audio), timeout=60)
    assert len(finals) == 1 and finals[0].result_start_time.ToNanoseconds() == 0
    assert finals[0].alternatives[0].transcript == unary.results[0].alternatives[0].transcript


def test_a_deadline_passing_mid_decode_fails_only_that_call(served) -> None:
    assert served.handle is not None and served.handle.batcher is not None
    gate = HoldFirstStep(served.handle.batcher)  # type: ignore[arg-type]
    stub = served.stub()
    slow = stub.Recognize.future(request(seed=3), timeout=1.0)
    assert gate.entered.wait(30)  # it is decoding, held at its first step
    with pytest.raises(grpc.RpcError) as caught:
        slow.result()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    gate.release.set()
    ok = stub.Recognize(request(seed=4), timeout=60)
    assert ok.results
    batcher = served.handle.batcher
    assert batcher.in_flight == 0  # the expired window left the decode batch


async def test_unavailable_while_loading_and_while_draining(model) -> None:
    handle = await build_server(SETTINGS.replace(host="127.0.0.1", port=0, metrics_port=-1))
    await handle.server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        stub = asr_pb2_grpc.SpeechStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as loading:
            await stub.Recognize(request(), timeout=30)
        assert loading.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "loading" in (loading.value.details() or "")
        await handle.serve_model(model)
        assert handle.batcher is not None
        gate = HoldFirstStep(handle.batcher)  # type: ignore[arg-type]
        running = asyncio.ensure_future(stub.Recognize(request(seed=5), timeout=60))
        assert await asyncio.to_thread(gate.entered.wait, 30)
        draining = asyncio.ensure_future(handle.batcher.drain(30))
        await asyncio.sleep(0)  # drain() has stopped admissions
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Recognize(request(seed=6), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        threading.Thread(target=gate.release.set).start()
        assert (await running).results  # the call in flight finished
        assert await draining
    await handle.drain_and_stop(5)
