"""asr.v1 refuses the Google Cloud Speech fields it does not serve, by name, instead of dropping
them: a Google-shaped message (same names and numbers) sent to asr.v1 over a real loopback
server gets INVALID_ARGUMENT naming the field and what to use instead."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from asr.v1 import asr_pb2
from asr.vendors import google_speech_pb2 as google
from server.config import Settings
from server.embedded import EmbeddedServer
from server.models.fake import FakeModel
from server.unserved import UNSERVED_CONFIG_FIELDS
from tests.conftest import tone, wav_bytes

AUDIO = wav_bytes(tone(440, 1.0, 16_000), 16_000)
PCM = (tone(440, 1.0, 16_000) * 32767).astype("<i2").tobytes()
UNSERVED: dict[str, dict[str, Any]] = {
    "profanity_filter": {"profanity_filter": True},
    "speech_contexts": {"speech_contexts": [google.SpeechContext(phrases=["Kubernetes"])]},
    "enable_separate_recognition_per_channel": {"enable_separate_recognition_per_channel": True},
    "enable_word_confidence": {"enable_word_confidence": True},
    "diarization_config": {
        "diarization_config": google.SpeakerDiarizationConfig(enable_speaker_diarization=True)
    },
}
INSTEAD = {
    "speech_contexts": "initial_prompt",
    "enable_word_confidence": "enable_word_time_offsets",
}


@pytest.fixture(scope="module")
def served():
    server = EmbeddedServer(Settings(), FakeModel()).start()
    yield server
    server.stop()


def recognize_as_google(served, request: google.RecognizeRequest) -> asr_pb2.RecognizeResponse:
    """Google's message, serialized as Google's client would, sent to asr.v1's Recognize."""
    call = served.channel().unary_unary(
        "/asr.v1.Speech/Recognize",
        request_serializer=google.RecognizeRequest.SerializeToString,
        response_deserializer=asr_pb2.RecognizeResponse.FromString,
    )
    return call(request, timeout=30)


def test_the_table_names_googles_own_numbers():
    fields = google.RecognitionConfig.DESCRIPTOR.fields_by_name
    for number, (name, _) in UNSERVED_CONFIG_FIELDS.items():
        assert fields[name].number == number
        assert asr_pb2.RecognitionConfig.DESCRIPTOR.fields_by_number.get(number) is None


@pytest.mark.parametrize("field", sorted(UNSERVED))
def test_a_google_field_asr_v1_does_not_serve_is_refused_by_name(served, field):
    config = google.RecognitionConfig(**UNSERVED[field])
    request = google.RecognizeRequest(config=config, audio=google.RecognitionAudio(content=AUDIO))
    with pytest.raises(grpc.RpcError) as info:
        recognize_as_google(served, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"config.{field} " in info.value.details()
    assert "not supported by asr.v1" in info.value.details()
    if field in INSTEAD:
        assert INSTEAD[field] in info.value.details()


def test_google_fields_asr_v1_has_or_may_ignore_are_served(served):
    config = google.RecognitionConfig(
        language_code="en", enable_word_time_offsets=True, enable_automatic_punctuation=True
    )
    request = google.RecognizeRequest(config=config, audio=google.RecognitionAudio(content=AUDIO))
    assert recognize_as_google(served, request).results


def test_a_stream_whose_config_sets_one_is_refused_too(served):
    call = served.channel().stream_stream(
        "/asr.v1.Speech/StreamingRecognize",
        request_serializer=google.StreamingRecognizeRequest.SerializeToString,
        response_deserializer=asr_pb2.StreamingRecognizeResponse.FromString,
    )
    config = google.RecognitionConfig(
        encoding=google.RecognitionConfig.LINEAR16,
        sample_rate_hertz=16_000,
        speech_contexts=[google.SpeechContext(phrases=["Kubernetes"])],
    )
    messages = [
        google.StreamingRecognizeRequest(
            streaming_config=google.StreamingRecognitionConfig(config=config)
        ),
        google.StreamingRecognizeRequest(audio_content=PCM),
    ]
    with pytest.raises(grpc.RpcError) as info:
        list(call(iter(messages), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.speech_contexts" in info.value.details()
    assert "initial_prompt" in info.value.details()
