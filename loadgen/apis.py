"""The speech APIs the load generator can drive (`--api`): whisper-grpc's own `asr.v1`, and
the drop-in `google.cloud.speech.v1` and `nvidia.riva.asr`, with the request shapes those
vendors' clients send (so a user load-tests what their services will send; the same flags
can also be pointed at a real Google-compatible or Riva server to compare).

Each API builds its unary request from a dataset item once, sends the stream of LINEAR16
chunks, and reads back (text, asr.v1 ServerTiming or None): only asr.v1 reports timing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from asr.v1 import asr_pb2, asr_pb2_grpc
from asr.vendors import google_speech_pb2 as gs
from asr.vendors import google_speech_pb2_grpc, riva_asr_pb2, riva_asr_pb2_grpc, riva_audio_pb2
from loadgen.dataset import Item

STREAM_CHUNK_MS = 100
LANGUAGE = "en-US"  # what the vendors' clients send (they require a language)

Config = asr_pb2.RecognitionConfig
GConfig = gs.RecognitionConfig
Riva = riva_audio_pb2.AudioEncoding
_ASR_ENCODINGS: dict[str, Any] = {
    "FLAC": Config.FLAC,
    "WAV": Config.WAV,
    "OGG": Config.OGG,
    "": Config.ENCODING_UNSPECIFIED,
}
# Google and Riva name no WAV or Vorbis encoding: files go as "unspecified" (the header says).
_GOOGLE_ENCODINGS: dict[str, Any] = {"FLAC": GConfig.FLAC}
_RIVA_ENCODINGS: dict[str, Any] = {"FLAC": Riva.FLAC}


def chunks(pcm: bytes, rate: int) -> Iterator[bytes]:
    step = max(2, rate * 2 * STREAM_CHUNK_MS // 1000)
    for start in range(0, len(pcm), step):
        yield pcm[start : start + step]


@dataclass(frozen=True)
class Api:
    """One API: its health service name, stub, request builders and response readers."""

    name: str
    service: str

    def stub(self, channel: grpc.Channel) -> Any:
        raise NotImplementedError

    def unary_request(self, item: Item) -> Any:
        raise NotImplementedError

    def recognize(self, stub: Any, request: Any, **call: Any) -> tuple[str, Any]:
        response = stub.Recognize(request, **call)
        text = " ".join(r.alternatives[0].transcript for r in response.results if r.alternatives)
        timing = response.timing if self.name == "asr" and response.HasField("timing") else None
        return text.strip(), timing

    def config_request(self, rate: int, interim: bool = False, interim_interval_ms: int = 0) -> Any:
        """The first message of a stream: LINEAR16 at `rate`, interim results if asked."""
        raise NotImplementedError

    def audio_request(self, chunk: bytes) -> Any:
        raise NotImplementedError

    def result_end_s(self, result: Any) -> float:
        """Where the audio a streaming result reflects ends, in stream seconds."""
        return float(result.result_end_time.ToNanoseconds()) / 1e9

    def timing(self, response: Any) -> Any:
        """The response's asr.v1 ServerTiming, or None (only asr.v1 reports one)."""
        return response.timing if self.name == "asr" and response.HasField("timing") else None

    def stream_requests(self, pcm: bytes, rate: int) -> Iterator[Any]:
        return self.live_requests(chunks(pcm, rate), rate)

    def live_requests(
        self,
        pieces: Iterable[bytes],
        rate: int,
        interim: bool = False,
        interim_interval_ms: int = 0,
    ) -> Iterator[Any]:
        """The config, then one message per piece of audio as the iterable hands it out (a
        live stream's paced chunks)."""
        yield self.config_request(rate, interim, interim_interval_ms)
        for piece in pieces:
            yield self.audio_request(piece)

    def stream(self, stub: Any, pcm: bytes, rate: int, **call: Any) -> tuple[str, Any]:
        """Audio as fast as the stream takes it; the call ends when the server closes the
        stream after the last final result."""
        finals: list[str] = []
        timing = None
        for response in stub.StreamingRecognize(self.stream_requests(pcm, rate), **call):
            finals += [r.alternatives[0].transcript for r in response.results if r.is_final]
            if self.name == "asr" and response.HasField("timing"):
                timing = response.timing
        return " ".join(finals).strip(), timing


class AsrApi(Api):
    def stub(self, channel: grpc.Channel) -> asr_pb2_grpc.SpeechStub:
        return asr_pb2_grpc.SpeechStub(channel)

    def unary_request(self, item: Item) -> asr_pb2.RecognizeRequest:
        return asr_pb2.RecognizeRequest(
            config=Config(encoding=_ASR_ENCODINGS.get(item.encoding, Config.ENCODING_UNSPECIFIED)),
            audio=asr_pb2.RecognitionAudio(content=item.data),
        )

    def config_request(
        self, rate: int, interim: bool = False, interim_interval_ms: int = 0
    ) -> asr_pb2.StreamingRecognizeRequest:
        config = asr_pb2.StreamingRecognitionConfig(
            config=Config(encoding=Config.LINEAR16, sample_rate_hertz=rate, audio_channel_count=1),
            interim_results=interim,
            interim_interval_ms=interim_interval_ms,
        )
        return asr_pb2.StreamingRecognizeRequest(streaming_config=config)

    def audio_request(self, chunk: bytes) -> asr_pb2.StreamingRecognizeRequest:
        return asr_pb2.StreamingRecognizeRequest(audio_content=chunk)


class GoogleApi(Api):
    def stub(self, channel: grpc.Channel) -> google_speech_pb2_grpc.SpeechStub:
        return google_speech_pb2_grpc.SpeechStub(channel)

    def unary_request(self, item: Item) -> gs.RecognizeRequest:
        encoding = _GOOGLE_ENCODINGS.get(item.encoding, GConfig.ENCODING_UNSPECIFIED)
        return gs.RecognizeRequest(
            config=GConfig(encoding=encoding, language_code=LANGUAGE),
            audio=gs.RecognitionAudio(content=item.data),
        )

    def config_request(
        self, rate: int, interim: bool = False, interim_interval_ms: int = 0
    ) -> gs.StreamingRecognizeRequest:
        config = gs.StreamingRecognitionConfig(
            config=GConfig(
                encoding=GConfig.LINEAR16, sample_rate_hertz=rate, language_code=LANGUAGE
            ),
            interim_results=interim,
        )
        return gs.StreamingRecognizeRequest(streaming_config=config)

    def audio_request(self, chunk: bytes) -> gs.StreamingRecognizeRequest:
        return gs.StreamingRecognizeRequest(audio_content=chunk)


class RivaApi(Api):
    def stub(self, channel: grpc.Channel) -> riva_asr_pb2_grpc.RivaSpeechRecognitionStub:
        return riva_asr_pb2_grpc.RivaSpeechRecognitionStub(channel)

    def unary_request(self, item: Item) -> riva_asr_pb2.RecognizeRequest:
        encoding = _RIVA_ENCODINGS.get(item.encoding, Riva.ENCODING_UNSPECIFIED)
        config = riva_asr_pb2.RecognitionConfig(
            encoding=encoding, language_code=LANGUAGE, max_alternatives=1
        )
        return riva_asr_pb2.RecognizeRequest(config=config, audio=item.data)

    def config_request(
        self, rate: int, interim: bool = False, interim_interval_ms: int = 0
    ) -> riva_asr_pb2.StreamingRecognizeRequest:
        config = riva_asr_pb2.StreamingRecognitionConfig(
            config=riva_asr_pb2.RecognitionConfig(
                encoding=Riva.LINEAR_PCM,
                sample_rate_hertz=rate,
                language_code=LANGUAGE,
                max_alternatives=1,
            ),
            interim_results=interim,
        )
        return riva_asr_pb2.StreamingRecognizeRequest(streaming_config=config)

    def audio_request(self, chunk: bytes) -> riva_asr_pb2.StreamingRecognizeRequest:
        return riva_asr_pb2.StreamingRecognizeRequest(audio_content=chunk)

    def result_end_s(self, result: Any) -> float:
        return float(result.audio_processed)  # Riva's end of the audio a result reflects


APIS: dict[str, Api] = {
    "asr": AsrApi("asr", "asr.v1.Speech"),
    "google": GoogleApi("google", "google.cloud.speech.v1.Speech"),
    "riva": RivaApi("riva", "nvidia.riva.asr.RivaSpeechRecognition"),
}
