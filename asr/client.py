"""A small typed client for whisper-grpc's `asr.v1.Speech`: unary and streaming recognition
from a file, from bytes, or from any iterable of audio chunks (a microphone callback's queue,
a socket), on top of the generated stubs in `asr.v1`.

Needs only grpcio and protobuf (no torch, no numpy): it ships alone as the
`whisper-grpc-client` distribution (`pip install ./clients/python`).

    from asr.client import SpeechClient

    with SpeechClient("localhost:50051") as client:
        print(client.recognize_file("jfk.flac").text)
        for update in client.stream_file("jfk.wav", realtime=True):
            print("final" if update.is_final else "interim", update.text)
"""

from __future__ import annotations

import time
import wave
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc

from asr.v1 import asr_pb2, asr_pb2_grpc

Config = asr_pb2.RecognitionConfig
CHUNK_MS = 100
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_SUFFIXES = {".flac": Config.FLAC, ".wav": Config.WAV, ".ogg": Config.OGG, ".opus": Config.OGG}


@dataclass(frozen=True)
class Word:
    word: str
    start_s: float
    end_s: float
    confidence: float


@dataclass(frozen=True)
class Transcript:
    """What a unary call heard: its text, segments and words, and the raw response."""

    text: str
    segments: list[str]
    words: list[Word]
    language: str
    response: asr_pb2.RecognizeResponse = field(repr=False)


@dataclass(frozen=True)
class StreamUpdate:
    """One interim or final result of a stream."""

    text: str
    is_final: bool
    stability: float
    start_s: float
    end_s: float
    end_of_single_utterance: bool = False


def _seconds(duration: object) -> float:
    return float(duration.ToNanoseconds()) / 1e9  # type: ignore[attr-defined]


class SpeechClient:
    """One channel to a server; thread-safe like the gRPC channel it holds."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        channel: grpc.Channel | None = None,
        timeout_s: float = 120.0,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        self.channel = channel or grpc.insecure_channel(target, options)
        self.stub = asr_pb2_grpc.SpeechStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = metadata

    def __enter__(self) -> SpeechClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def info(self) -> asr_pb2.ServerInfo:
        """The model, device, batching settings and limits of the server."""
        return self.stub.GetServerInfo(
            asr_pb2.GetServerInfoRequest(), timeout=self.timeout_s, metadata=self.metadata
        )

    def recognize(
        self,
        content: bytes,
        *,
        encoding: int = Config.ENCODING_UNSPECIFIED,
        sample_rate_hz: int = 0,
        language: str = "",
        word_times: bool = False,
        prompt: str = "",
    ) -> Transcript:
        """Recognize a whole file's bytes (WAV, FLAC, OGG: the header says the format) or raw
        LINEAR16 (`encoding=Config.LINEAR16` and `sample_rate_hz`)."""
        config = Config(
            encoding=encoding,  # type: ignore[arg-type]
            sample_rate_hertz=sample_rate_hz,
            language_code=language,
            enable_word_time_offsets=word_times,
            initial_prompt=prompt,
        )
        request = asr_pb2.RecognizeRequest(
            config=config, audio=asr_pb2.RecognitionAudio(content=content)
        )
        response = self.stub.Recognize(request, timeout=self.timeout_s, metadata=self.metadata)
        segments = [r.alternatives[0].transcript for r in response.results if r.alternatives]
        words = [
            Word(w.word, _seconds(w.start_time), _seconds(w.end_time), w.confidence)
            for r in response.results
            for w in (r.alternatives[0].words if r.alternatives else [])
        ]
        language_code = response.results[0].language_code if response.results else language
        return Transcript(" ".join(segments), segments, words, language_code, response)

    def recognize_file(self, path: str | Path, **options: object) -> Transcript:
        path = Path(path)
        encoding = _SUFFIXES.get(path.suffix.lower(), Config.ENCODING_UNSPECIFIED)
        return self.recognize(path.read_bytes(), encoding=encoding, **options)  # type: ignore[arg-type]

    def stream(
        self,
        chunks: Iterable[bytes],
        *,
        sample_rate_hz: int = 16_000,
        channels: int = 1,
        interim_results: bool = True,
        single_utterance: bool = False,
        language: str = "",
    ) -> Iterator[StreamUpdate]:
        """Stream raw LINEAR16 chunks as they come (a microphone's callback queue, a socket:
        any iterable); yields interim and final results while the audio is still arriving.
        The stream ends when `chunks` is exhausted and the last final is in."""
        config = asr_pb2.StreamingRecognitionConfig(
            config=Config(
                encoding=Config.LINEAR16,
                sample_rate_hertz=sample_rate_hz,
                audio_channel_count=channels,
                language_code=language,
            ),
            interim_results=interim_results,
            single_utterance=single_utterance,
        )

        def requests() -> Iterator[asr_pb2.StreamingRecognizeRequest]:
            yield asr_pb2.StreamingRecognizeRequest(streaming_config=config)
            for chunk in chunks:
                yield asr_pb2.StreamingRecognizeRequest(audio_content=chunk)

        responses = self.stub.StreamingRecognize(
            requests(), timeout=self.timeout_s, metadata=self.metadata
        )
        eou = asr_pb2.StreamingRecognizeResponse.END_OF_SINGLE_UTTERANCE
        for response in responses:
            for r in response.results:
                yield StreamUpdate(
                    r.alternatives[0].transcript if r.alternatives else "",
                    r.is_final,
                    r.stability,
                    _seconds(r.result_start_time),
                    _seconds(r.result_end_time),
                )
            if response.speech_event_type == eou:
                yield StreamUpdate("", True, 1.0, 0.0, 0.0, end_of_single_utterance=True)

    def stream_file(
        self, path: str | Path, *, realtime: bool = False, **options: object
    ) -> Iterator[StreamUpdate]:
        """Stream a 16-bit PCM WAV file in 100 ms chunks, paced like a microphone when
        `realtime`, else as fast as the server reads."""
        with wave.open(str(path), "rb") as wav:
            if wav.getsampwidth() != 2:
                raise ValueError(f"{path}: stream_file needs 16-bit PCM WAV")
            rate, channels = wav.getframerate(), wav.getnchannels()
            frames = wav.readframes(wav.getnframes())
        yield from self.stream(
            paced_chunks(frames, rate, channels, realtime),
            sample_rate_hz=rate,
            channels=channels,
            **options,  # type: ignore[arg-type]
        )


def paced_chunks(
    pcm: bytes, rate: int, channels: int = 1, realtime: bool = False
) -> Iterator[bytes]:
    """LINEAR16 bytes -> 100 ms chunks; with `realtime`, each one when a microphone would
    have delivered it."""
    step = 2 * channels * rate * CHUNK_MS // 1000
    started = time.monotonic()
    for i, start in enumerate(range(0, len(pcm), step)):
        if realtime:
            time.sleep(max(0.0, started + i * CHUNK_MS / 1000 - time.monotonic()))
        yield pcm[start : start + step]
