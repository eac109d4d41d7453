"""StreamingRecognize and the speech gates with real tiny.en weights and real speech."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf

from asr.v1 import asr_pb2
from loadgen.wer import word_error_rate
from tests.conftest import JFK_WAV, librispeech_items, require_data, wav_bytes

Config = asr_pb2.RecognitionConfig
Req = asr_pb2.StreamingRecognizeRequest
CHUNK_S = 0.1


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def messages(samples: np.ndarray, realtime: bool, interim: bool = True, sent=None):
    config = Config(encoding=Config.LINEAR16, sample_rate_hertz=16_000)
    yield Req(
        streaming_config=asr_pb2.StreamingRecognitionConfig(config=config, interim_results=interim)
    )
    step = int(16_000 * CHUNK_S)
    started = time.monotonic()
    for i in range(0, len(samples), step):
        if realtime:  # pacing the client like a microphone, not waiting for server state
            time.sleep(max(0.0, started + i / 16_000 - time.monotonic()))
        yield Req(audio_content=pcm16(samples[i : i + step]))
    if sent is not None:
        sent.append(time.monotonic())


def run(stub, samples, realtime=False, interim=True):
    """Returns (responses with arrival times, time the last chunk was sent)."""
    sent: list[float] = []
    got = []
    for response in stub.StreamingRecognize(
        messages(samples, realtime, interim, sent), timeout=300
    ):
        got.append((time.monotonic(), response))
    return got, sent[0]


def finals_text(got) -> str:
    return " ".join(
        r.alternatives[0].transcript for _, resp in got for r in resp.results if r.is_final
    )


def longest_clean():
    require_data()
    items = librispeech_items("test-clean")
    _uid, path, ref = max(items, key=lambda i: sf.info(i[1]).duration)
    return sf.read(path, dtype="float32")[0], ref


def test_realtime_stream_gives_interims_before_the_end_and_finals_like_unary(real_server):
    audio, ref = longest_clean()
    stub = real_server.stub()
    got, last_sent = run(stub, audio, realtime=True)
    interims = [(t, r) for t, resp in got for r in resp.results if not r.is_final]
    assert interims and interims[0][0] < last_sent  # text while the audio was still coming
    # stability = the share of an interim's words that are committed (LocalAgreement-2):
    # the first interim of an utterance has none, committed words are never taken back by a
    # later interim of the same utterance, and some interims do commit words.
    previous: list[str] | None = None
    for _, resp in got:
        for r in resp.results:
            if r.is_final:
                previous = None
                continue
            words = r.alternatives[0].transcript.split()
            if previous is None:
                assert r.stability == 0.0
            else:
                assert words[: len(previous)] == previous  # the committed prefix stays
            previous = words[: round(r.stability * len(words))]
    assert any(r.stability > 0 for _, r in interims)
    unary = stub.Recognize(
        asr_pb2.RecognizeRequest(audio=asr_pb2.RecognitionAudio(content=wav_bytes(audio, 16_000))),
        timeout=120,
    )
    unary_text = " ".join(r.alternatives[0].transcript for r in unary.results)
    stream_text = finals_text(got)
    assert word_error_rate([ref], [stream_text]) <= word_error_rate([ref], [unary_text]) + 0.1
    # The same file sent as fast as possible gives the same finals.
    fast, _ = run(stub, audio, realtime=False, interim=False)
    assert finals_text(fast) == stream_text


def test_eight_concurrent_streams_share_batches_without_cross_talk(real_server):
    require_data()
    items = librispeech_items("test-other")[:8]
    clips = [sf.read(path, dtype="float32")[0] for _, path, _ in items]
    stub = real_server.stub()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: run(stub, c, realtime=False, interim=True)[0], clips))
    texts = [finals_text(got) for got in results]
    for (_, _, ref), text in zip(items, texts, strict=True):
        assert word_error_rate([ref], [text]) < 0.35, (ref, text)
    batch_sizes = [resp.timing.batch_size for got in results for _, resp in got]
    assert max(batch_sizes) > 1


@pytest.mark.parametrize("kind", ["silence", "noise"])
def test_no_speech_gives_no_text_in_streams_and_recognize(real_server, kind):
    rng = np.random.default_rng(0)
    n = 16_000 * 8
    audio = (
        np.zeros(n, np.float32) if kind == "silence" else rng.normal(0, 0.1, n).astype(np.float32)
    )
    stub = real_server.stub()
    got, _ = run(stub, audio, realtime=False, interim=True)
    assert not [r for _, resp in got for r in resp.results]
    unary = stub.Recognize(
        asr_pb2.RecognizeRequest(audio=asr_pb2.RecognitionAudio(content=wav_bytes(audio, 16_000))),
        timeout=120,
    )
    assert not unary.results


def test_word_times_match_where_words_are_spoken_across_a_known_gap(real_server):
    require_data()
    jfk = sf.read(JFK_WAV, dtype="float32")[0]
    gap_s = 3.0
    audio = np.concatenate([jfk, np.zeros(int(16_000 * gap_s), np.float32), jfk])
    request = asr_pb2.RecognizeRequest(
        config=Config(enable_word_time_offsets=True),
        audio=asr_pb2.RecognitionAudio(content=wav_bytes(audio, 16_000)),
    )
    response = real_server.stub().Recognize(request, timeout=120)
    words = [w for r in response.results for w in r.alternatives[0].words]
    starts = [w.start_time.ToMilliseconds() / 1000 for w in words]
    assert starts == sorted(starts)
    assert all(0 <= w.start_time.ToMilliseconds() <= w.end_time.ToMilliseconds() for w in words)
    assert words[-1].end_time.ToMilliseconds() / 1000 <= len(audio) / 16_000 + 0.05
    # The second "And" starts right after the gap: 11 s of speech + 3 s of silence.
    second_and = [w for w in words if w.word.strip(",.").lower() == "and"][1]
    assert abs(second_and.start_time.ToMilliseconds() / 1000 - (11.0 + gap_s)) < 1.0
    # The stream gives the same words in its finals.
    got, _ = run(real_server.stub(), audio, realtime=False, interim=False)
    assert finals_text(got).lower().count("country") == 4
