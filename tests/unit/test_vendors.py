"""The Google and Riva drop-in services through a real gRPC server on loopback with the fake
model, driven by our own stubs of their protos: encodings (G.711, WAV headers in front of raw
audio), shapes, errors, health, reflection, metrics. The vendors' real clients are in
tests/integration/test_vendor_clients.py."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from asr.vendors import google_speech_pb2 as gs
from asr.vendors import google_speech_pb2_grpc, riva_asr_pb2, riva_asr_pb2_grpc, riva_audio_pb2
from server.config import Settings
from server.embedded import EmbeddedServer
from server.models.fake import FakeModel
from server.vendors.common import without_wav_header
from tests.conftest import tone, wav_bytes

GConfig = gs.RecognitionConfig
Riva = riva_audio_pb2.AudioEncoding
GOOGLE = "google.cloud.speech.v1.Speech"
RIVA = "nvidia.riva.asr.RivaSpeechRecognition"
V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"


@pytest.fixture(scope="module")
def served():
    server = EmbeddedServer(Settings(max_batch_size=4, max_wait_ms=5), FakeModel()).start()
    yield server
    server.stop()


def google(server) -> google_speech_pb2_grpc.SpeechStub:
    return google_speech_pb2_grpc.SpeechStub(server.channel())


def riva(server) -> riva_asr_pb2_grpc.RivaSpeechRecognitionStub:
    return riva_asr_pb2_grpc.RivaSpeechRecognitionStub(server.channel())


def raw(samples: np.ndarray, rate: int, subtype: str) -> bytes:
    """Headerless audio (ULAW, ALAW, PCM_16) as libsndfile encodes it."""
    return wav_bytes(samples, rate, subtype=subtype, fmt="RAW")


def samples_seen(transcript: str) -> int:
    return int(transcript.split()[0].removeprefix("n="))  # the fake says "n=<samples> ..."


@pytest.mark.parametrize(
    ("encoding", "content"),
    [
        (GConfig.MULAW, raw(tone(440, 1.0, 8000), 8000, "ULAW")),
        (GConfig.LINEAR16, raw(tone(440, 1.0, 8000), 8000, "PCM_16")),
        # Google reads a WAV header in front of LINEAR16 or MULAW audio.
        (GConfig.MULAW, wav_bytes(tone(440, 1.0, 8000), 8000, subtype="ULAW")),
        (GConfig.LINEAR16, wav_bytes(tone(440, 1.0, 8000), 8000)),
    ],
    ids=["mulaw", "linear16", "mulaw-wav", "linear16-wav"],
)
def test_google_recognize_telephony_audio(served, encoding, content):
    config = GConfig(encoding=encoding, sample_rate_hertz=8000, language_code="en-US")
    response = google(served).Recognize(
        gs.RecognizeRequest(config=config, audio=gs.RecognitionAudio(content=content)), timeout=10
    )
    [result] = response.results
    assert samples_seen(result.alternatives[0].transcript) == 16_000  # 1 s, resampled to 16 kHz
    assert result.language_code == "en-US"
    assert result.result_end_time.ToMilliseconds() == 1000
    assert response.total_billed_time.ToMilliseconds() == 1000


@pytest.mark.parametrize(
    ("encoding", "fmt", "subtype"),
    [
        (GConfig.MP3, "MP3", "MPEG_LAYER_III"),
        (GConfig.OGG_OPUS, "OGG", "OPUS"),
        (GConfig.FLAC, "FLAC", "PCM_16"),
        (GConfig.ENCODING_UNSPECIFIED, "WAV", "PCM_16"),
    ],
)
def test_google_recognize_files(served, encoding, fmt, subtype):
    content = wav_bytes(tone(440, 2.0, 48_000), 48_000, subtype=subtype, fmt=fmt)
    config = GConfig(encoding=encoding, language_code="en-US")
    response = google(served).Recognize(
        gs.RecognizeRequest(config=config, audio=gs.RecognitionAudio(content=content)), timeout=10
    )
    # 2 s at 16 kHz, give or take the codec's padding.
    assert abs(samples_seen(response.results[0].alternatives[0].transcript) - 32_000) < 2_000


def test_google_long_running_recognize_returns_a_done_operation(served):
    request = gs.LongRunningRecognizeRequest(
        audio=gs.RecognitionAudio(content=wav_bytes(tone(440, 2.0, 16_000), 16_000))
    )
    operation = google(served).LongRunningRecognize(request, timeout=10)
    assert operation.done and operation.name
    response = gs.LongRunningRecognizeResponse()
    assert operation.response.Unpack(response)
    assert samples_seen(response.results[0].alternatives[0].transcript) == 32_000
    metadata = gs.LongRunningRecognizeMetadata()
    assert operation.metadata.Unpack(metadata) and metadata.progress_percent == 100


@pytest.mark.parametrize(
    ("config", "audio", "message"),
    [
        (GConfig(encoding=GConfig.WEBM_OPUS), {"content": b"x"}, "OGG_OPUS"),
        (GConfig(encoding=GConfig.AMR), {"content": b"x"}, "AMR"),
        (GConfig(), {"uri": "gs://bucket/audio.flac"}, "Cloud Storage"),
        (GConfig(), {}, "audio.content is required"),
        (GConfig(profanity_filter=True), {"content": b"x"}, "profanity_filter"),
        (
            GConfig(enable_separate_recognition_per_channel=True),
            {"content": b"x"},
            "mono",
        ),
        (GConfig(language_code="de-DE"), {"content": b"x"}, "English-only"),
        (GConfig(model="chirp_3"), {"content": b"x"}, "not served here"),
    ],
)
def test_google_bad_requests_are_invalid_argument(served, config, audio, message):
    request = gs.RecognizeRequest(config=config, audio=gs.RecognitionAudio(**audio))
    with pytest.raises(grpc.RpcError) as info:
        google(served).Recognize(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_google_model_names_are_accepted(served):
    config = GConfig(model="latest_long", use_enhanced=True, enable_automatic_punctuation=True)
    content = wav_bytes(tone(440, 1.0, 16_000), 16_000)
    response = google(served).Recognize(
        gs.RecognizeRequest(config=config, audio=gs.RecognitionAudio(content=content)), timeout=10
    )
    assert response.results


def google_stream(config: gs.StreamingRecognitionConfig, chunks: list[bytes]):
    yield gs.StreamingRecognizeRequest(streaming_config=config)
    for chunk in chunks:
        yield gs.StreamingRecognizeRequest(audio_content=chunk)


def test_google_stream_of_mulaw_with_single_utterance(served):
    audio = raw(tone(440, 1.0, 8000), 8000, "ULAW")
    config = gs.StreamingRecognitionConfig(
        config=GConfig(encoding=GConfig.MULAW, sample_rate_hertz=8000), single_utterance=True
    )
    chunks = [audio[i : i + 800] for i in range(0, len(audio), 800)]
    responses = list(google(served).StreamingRecognize(google_stream(config, chunks), timeout=10))
    finals = [r for resp in responses for r in resp.results if r.is_final]
    assert len(finals) == 1
    assert abs(finals[0].result_end_time.ToMilliseconds() - 1000) <= 20
    assert responses[-1].speech_event_type == gs.StreamingRecognizeResponse.END_OF_SINGLE_UTTERANCE


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (GConfig(encoding=GConfig.FLAC), "LINEAR16 or MULAW"),
        (GConfig(encoding=GConfig.LINEAR16), "sample_rate_hertz"),
    ],
)
def test_google_bad_stream_configs(served, config, message):
    streaming = gs.StreamingRecognitionConfig(config=config)
    with pytest.raises(grpc.RpcError) as info:
        list(google(served).StreamingRecognize(google_stream(streaming, [b"\0\0"]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


@pytest.mark.parametrize(
    ("encoding", "content", "rate"),
    [
        (Riva.ALAW, raw(tone(440, 1.0, 8000), 8000, "ALAW"), 8000),
        (Riva.MULAW, raw(tone(440, 1.0, 8000), 8000, "ULAW"), 8000),
        # What riva.client sends for a WAV file: its bytes, header included, as LINEAR_PCM.
        (Riva.LINEAR_PCM, wav_bytes(tone(440, 1.0, 16_000), 16_000), 16_000),
        (Riva.FLAC, wav_bytes(tone(440, 1.0, 16_000), 16_000, fmt="FLAC"), 0),
        (Riva.OGGOPUS, wav_bytes(tone(440, 1.0, 16_000), 16_000, "OPUS", "OGG"), 0),
    ],
    ids=["alaw", "mulaw", "wav-as-linear-pcm", "flac", "oggopus"],
)
def test_riva_recognize(served, encoding, content, rate):
    config = riva_asr_pb2.RecognitionConfig(
        encoding=encoding, sample_rate_hertz=rate, language_code="en-US"
    )
    request = riva_asr_pb2.RecognizeRequest(
        config=config, audio=content, id=riva_audio_pb2.RequestId(value="r-1")
    )
    response = riva(served).Recognize(request, timeout=10)
    [result] = response.results
    assert samples_seen(result.alternatives[0].transcript) == 16_000
    assert list(result.alternatives[0].language_code) == ["en-US"]
    assert result.audio_processed == pytest.approx(1.0)
    assert response.id.value == "r-1"


def test_riva_stream_skips_the_wav_header_split_over_chunks(served):
    wav = wav_bytes(tone(440, 1.0, 16_000), 16_000)
    config = riva_asr_pb2.StreamingRecognitionConfig(
        config=riva_asr_pb2.RecognitionConfig(encoding=Riva.LINEAR_PCM, sample_rate_hertz=16_000)
    )

    def requests():
        yield riva_asr_pb2.StreamingRecognizeRequest(
            streaming_config=config, id=riva_audio_pb2.RequestId(value="s-1")
        )
        for i in range(0, len(wav), 30):  # the 44-byte header spans two messages
            yield riva_asr_pb2.StreamingRecognizeRequest(audio_content=wav[i : i + 30])

    responses = list(riva(served).StreamingRecognize(requests(), timeout=10))
    finals = [r for resp in responses for r in resp.results if r.is_final]
    # Exactly 1 s of audio: the header's 44 bytes were not taken for 22 samples.
    assert [f.audio_processed for f in finals] == [pytest.approx(1.0, abs=1e-6)]
    assert all(resp.id.value == "s-1" for resp in responses)


def test_riva_config_and_bad_requests(served):
    stub = riva(served)
    reply = stub.GetRivaSpeechRecognitionConfig(riva_asr_pb2.RivaSpeechRecognitionConfigRequest())
    [config] = reply.model_config
    assert config.model_name == "fake" and config.parameters["max_batch_size"] == "4"
    other = riva_asr_pb2.RivaSpeechRecognitionConfigRequest(model_name="parakeet")
    assert not stub.GetRivaSpeechRecognitionConfig(other).model_config
    bad = riva_asr_pb2.RecognizeRequest(
        config=riva_asr_pb2.RecognitionConfig(encoding=Riva.FLAC, model="parakeet"), audio=b"x"
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.Recognize(bad, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'fake'" in info.value.details()


def test_health_serves_the_vendor_services(served):
    stub = health_pb2_grpc.HealthStub(served.channel())
    for service in (GOOGLE, RIVA):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
def test_reflection_v1_and_v1alpha_list_and_describe_the_services(served, version):
    call = served.channel().stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    packages = {GOOGLE: "google.cloud.speech.v1", RIVA: "nvidia.riva.asr", V1: "grpc.reflection.v1"}
    describe = [
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=name) for name in packages
    ]
    replies = list(call(iter([listing, *describe]), timeout=5))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"asr.v1.Speech", GOOGLE, RIVA, "grpc.health.v1.Health", V1, V1ALPHA} <= names
    for reply, package in zip(replies[1:], packages.values(), strict=True):
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(f)
            for f in reply.file_descriptor_response.file_descriptor_proto
        ]
        assert package in {f.package for f in files}


def test_reflection_stub_v1alpha_still_works(served):
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel())
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(stub.ServerReflectionInfo(iter([request]), timeout=5))
    assert RIVA in {s.name for s in reply.list_services_response.service}


def test_vendor_requests_are_counted_by_service_and_method(served):
    with pytest.raises(grpc.RpcError):
        google(served).Recognize(gs.RecognizeRequest(), timeout=10)
    registry = served.handle.metrics.registry
    label = {"method": f"{GOOGLE}/Recognize", "code": "INVALID_ARGUMENT"}
    assert registry.get_sample_value("asr_requests_total", label) >= 1


async def _collect(chunks: list[bytes]) -> bytes:
    async def source():
        for chunk in chunks:
            yield chunk

    return b"".join([c async for c in without_wav_header(source())])


def test_wav_header_is_stripped_however_it_is_chunked():
    pcm = raw(tone(440, 0.1, 16_000), 16_000, "PCM_16")
    wav = wav_bytes(tone(440, 0.1, 16_000), 16_000)
    for size in (1, 7, 44, 45, 1000):
        chunks = [wav[i : i + size] for i in range(0, len(wav), size)]
        assert asyncio.run(_collect(chunks)) == pcm
    assert asyncio.run(_collect([pcm[:5], pcm[5:]])) == pcm  # no header: left as it is
    assert asyncio.run(_collect([pcm[:6]])) == pcm[:6]  # too short for a header: audio
    assert asyncio.run(_collect([wav[:40]])) == b""  # a header cut short: no samples


def test_riva_stream_must_start_with_its_config(served):
    def requests():
        yield riva_asr_pb2.StreamingRecognizeRequest(audio_content=b"\0\0" * 160)

    with pytest.raises(grpc.RpcError) as info:
        list(riva(served).StreamingRecognize(requests(), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message must carry streaming_config" in info.value.details()
