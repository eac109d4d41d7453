"""`--api`: the request shapes the load generator sends for asr.v1, Google and Riva."""

from __future__ import annotations

import pytest

from asr.vendors import google_speech_pb2 as gs
from asr.vendors import riva_audio_pb2
from loadgen.apis import APIS
from loadgen.dataset import Item

FLAC = Item("a", b"fLaC...", 1.0, "ref", "FLAC")
WAV = Item("b", b"RIFF....WAVE", 1.0, None, "WAV")


def test_vendor_unary_requests_look_like_their_clients():
    google = APIS["google"].unary_request(FLAC)
    assert google.config.encoding == gs.RecognitionConfig.FLAC
    assert google.config.language_code == "en-US" and google.audio.content == FLAC.data
    # Google and Riva have no WAV encoding: a file goes as "unspecified" (the header says).
    assert APIS["google"].unary_request(WAV).config.encoding == 0
    riva = APIS["riva"].unary_request(FLAC)
    assert riva.config.encoding == riva_audio_pb2.FLAC and riva.audio == FLAC.data
    assert APIS["riva"].unary_request(WAV).config.encoding == riva_audio_pb2.ENCODING_UNSPECIFIED


@pytest.mark.parametrize("name", ["asr", "google", "riva"])
def test_streams_send_the_config_then_100_ms_chunks(name):
    pcm = bytes(2 * 4000)  # 0.5 s of 16-bit samples at 8 kHz
    first, *rest = list(APIS[name].stream_requests(pcm, 8000))
    assert first.WhichOneof("streaming_request") == "streaming_config"
    assert first.streaming_config.config.sample_rate_hertz == 8000
    assert [len(r.audio_content) for r in rest] == [1600] * 5
