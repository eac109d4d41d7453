"""The Speech servicer: protobuf in, plain dataclasses to the recognizer, protobuf out.

The only module besides `server.app` that imports generated code. Handlers are short scripts:
validate and convert the request, await the recognizer, convert the result. Errors are raised
as `server.errors` exceptions and mapped to statuses by `server.interceptors`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import metadata

import grpc
from google.protobuf.duration_pb2 import Duration

import server
from asr.v1 import asr_pb2, asr_pb2_grpc
from server.audio import AudioFormat, Encoding
from server.config import Settings
from server.errors import InvalidArgumentError, UnavailableError, UnimplementedError
from server.metrics import Metrics
from server.models.base import DecodeOptions
from server.recognizer import Recognition, Recognizer, Segment, Timing

Config = asr_pb2.RecognitionConfig

_ENCODINGS = {
    Config.ENCODING_UNSPECIFIED: Encoding.AUTO,
    Config.LINEAR16: Encoding.LINEAR16,
    Config.FLAC: Encoding.FLAC,
    Config.WAV: Encoding.WAV,
    Config.OGG: Encoding.OGG,
}
_TASKS = {
    Config.TASK_UNSPECIFIED: "transcribe",
    Config.TRANSCRIBE: "transcribe",
    Config.TRANSLATE: "translate",
}


@dataclass
class SpeechServicer(asr_pb2_grpc.SpeechServicer):
    settings: Settings
    metrics: Metrics
    recognizer: Recognizer | None = None  # None until the model is loaded and warmed up

    def _ready(self) -> Recognizer:
        if self.recognizer is None:
            raise UnavailableError("model is still loading; retry when health says SERVING")
        return self.recognizer

    async def Recognize(
        self, request: asr_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> asr_pb2.RecognizeResponse:
        recognizer = self._ready()
        fmt, options = self._convert_config(request.config, recognizer)
        if request.audio.WhichOneof("audio_source") != "content":
            raise InvalidArgumentError("audio.content is required")
        result = await recognizer.recognize(request.audio.content, fmt, options, _deadline(context))
        self.metrics.audio_seconds.inc(result.timing.audio_s)
        return _response(result)

    async def StreamingRecognize(
        self,
        request_iterator: AsyncIterator[asr_pb2.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[asr_pb2.StreamingRecognizeResponse]:
        raise UnimplementedError(
            "StreamingRecognize is not implemented by this server version; use Recognize"
        )
        yield asr_pb2.StreamingRecognizeResponse()  # pragma: no cover - makes this a generator

    async def GetServerInfo(
        self, request: asr_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> asr_pb2.ServerInfo:
        info = self._ready().model.info
        s = self.settings
        return asr_pb2.ServerInfo(
            model_id=info.model_id,
            multilingual=info.multilingual,
            device=info.device,
            device_name=info.device_name,
            dtype=info.dtype,
            max_batch_size=s.max_batch_size,
            max_wait_ms=int(s.max_wait_ms),
            max_queue_size=s.max_queue_size,
            max_audio_s=s.max_audio_s,
            server_version=server.__version__,
            torch_version=_version("torch"),
            transformers_version=_version("transformers"),
            max_message_bytes=s.max_message_bytes,
            languages=list(info.languages),
        )

    def _convert_config(
        self, config: asr_pb2.RecognitionConfig, recognizer: Recognizer
    ) -> tuple[AudioFormat, DecodeOptions]:
        if config.encoding not in _ENCODINGS:
            raise InvalidArgumentError(f"unknown audio encoding {config.encoding}")
        if config.task not in _TASKS:
            raise InvalidArgumentError(f"unknown task {config.task}")
        if config.sample_rate_hertz < 0:
            raise InvalidArgumentError(
                f"sample_rate_hertz must not be negative, not {config.sample_rate_hertz}"
            )
        if config.audio_channel_count < 0 or config.max_alternatives < 0:
            raise InvalidArgumentError("audio_channel_count and max_alternatives must be >= 0")
        if config.model and config.model != recognizer.model.info.model_id:
            raise InvalidArgumentError(
                f"model {config.model!r} is not served here; this server runs "
                f"{recognizer.model.info.model_id!r} (leave model empty to use it)"
            )
        if not 0.0 <= config.temperature <= 1.0:
            raise InvalidArgumentError(f"temperature must be in [0, 1], not {config.temperature}")
        if not 0 <= config.beam_size <= self.settings.max_beam_size:
            raise InvalidArgumentError(
                f"beam_size must be 0..{self.settings.max_beam_size}, not {config.beam_size}"
            )
        fmt = AudioFormat(
            _ENCODINGS[config.encoding], config.sample_rate_hertz, config.audio_channel_count
        )
        language = config.language_code.split("-")[0].lower() or None
        options = DecodeOptions(
            language=language,
            task=_TASKS[config.task],
            temperature=config.temperature,
            beam_size=max(1, config.beam_size),
            prompt=config.initial_prompt,
            word_timestamps=config.enable_word_time_offsets,
        )
        recognizer.model.check_options(options)
        return fmt, options


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def _timing(t: Timing) -> asr_pb2.ServerTiming:
    return asr_pb2.ServerTiming(
        queue_time=_duration(t.queue_s),
        inference_time=_duration(t.infer_s),
        total_time=_duration(t.total_s),
        batch_size=t.batch_size,
        audio_duration=_duration(t.audio_s),
        windows=t.windows,
    )


def _result(segment: Segment) -> asr_pb2.SpeechRecognitionResult:
    words = [
        asr_pb2.WordInfo(
            start_time=_duration(w.start_s),
            end_time=_duration(w.end_s),
            word=w.word,
            confidence=w.probability,
        )
        for w in segment.words
    ]
    alternative = asr_pb2.SpeechRecognitionAlternative(
        transcript=segment.text, confidence=segment.confidence, words=words
    )
    return asr_pb2.SpeechRecognitionResult(
        alternatives=[alternative],
        result_start_time=_duration(segment.start_s),
        result_end_time=_duration(segment.end_s),
        language_code=segment.language,
        no_speech_prob=segment.no_speech_prob,
    )


def _response(result: Recognition) -> asr_pb2.RecognizeResponse:
    return asr_pb2.RecognizeResponse(
        results=[_result(s) for s in result.segments],
        total_billed_time=_duration(result.timing.audio_s),
        timing=_timing(result.timing),
    )
