"""The asr.v1 edge: `asr.v1.Speech`'s messages in, plain types to the speech core, messages out.

A thin sibling of the Google and Riva edges in `server.vendors`: handlers are short scripts
that validate and convert the request, await `server.speech.SpeechCore`, and convert the
result. Errors are raised as `server.errors` exceptions and mapped to statuses by
`server.interceptors`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import metadata

import grpc

import server
from asr.v1 import asr_pb2, asr_pb2_grpc
from server.audio import AudioFormat, Encoding
from server.edge import audio_chunks, audio_time, duration, first_message, time_remaining_s
from server.errors import InvalidArgumentError
from server.models.base import MAX_PROMPT_BYTES, DecodeOptions
from server.recognizer import Recognition, Recognizer, Segment, Timing
from server.speech import SpeechCore, check_model
from server.streaming import StreamEvent, StreamSettings
from server.unserved import refuse_unserved_fields

Config = asr_pb2.RecognitionConfig

_ENCODINGS = {
    Config.ENCODING_UNSPECIFIED: Encoding.AUTO,
    Config.LINEAR16: Encoding.LINEAR16,
    Config.FLAC: Encoding.FLAC,
    Config.WAV: Encoding.WAV,
    Config.OGG: Encoding.OGG,
}
# Byte bounds of the text fields, checked before anything reads them (see MAX_PROMPT_BYTES).
MAX_LANGUAGE_BYTES = 35  # the longest BCP-47 tag in practical use
MAX_MODEL_BYTES = 256
_TASKS = {
    Config.TASK_UNSPECIFIED: "transcribe",
    Config.TRANSCRIBE: "transcribe",
    Config.TRANSLATE: "translate",
}


@dataclass
class SpeechServicer(asr_pb2_grpc.SpeechServicer):
    core: SpeechCore

    async def Recognize(
        self, request: asr_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> asr_pb2.RecognizeResponse:
        recognizer = self.core.ready()
        fmt, options = self._convert_config(request.config, recognizer)
        if request.audio.WhichOneof("audio_source") != "content":
            raise InvalidArgumentError("audio.content is required")
        result = await self.core.recognize(
            request.audio.content, fmt, options, time_remaining_s(context)
        )
        return _response(result)

    async def StreamingRecognize(
        self,
        request_iterator: AsyncIterator[asr_pb2.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[asr_pb2.StreamingRecognizeResponse]:
        recognizer = self.core.ready()
        with self.core.stream_slot():
            timeout_s = self.core.settings.stream_idle_timeout_s
            first = await first_message(request_iterator, timeout_s)
            if first is None:
                return  # the client closed without sending anything: nothing to recognize
            cfg = self._stream_settings(first.streaming_config, recognizer)
            async for event in self.core.stream(audio_chunks(request_iterator), cfg):
                yield _stream_response(event)

    def _stream_settings(
        self, streaming: asr_pb2.StreamingRecognitionConfig, recognizer: Recognizer
    ) -> StreamSettings:
        if not streaming.HasField("config"):
            raise InvalidArgumentError("streaming_config.config is required (it is empty)")
        config = streaming.config
        if config.encoding not in (Config.ENCODING_UNSPECIFIED, Config.LINEAR16):
            raise InvalidArgumentError("streams carry raw LINEAR16 audio; set encoding LINEAR16")
        fmt, options = self._convert_config(config, recognizer)
        return self.core.stream_settings(
            fmt,
            options,
            streaming.interim_results,
            streaming.single_utterance,
            streaming.endpoint_silence_ms,
            streaming.interim_interval_ms,
        )

    async def GetServerInfo(
        self, request: asr_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> asr_pb2.ServerInfo:
        recognizer = self.core.ready()
        info = recognizer.model.info
        engine = recognizer.batcher.engine
        s = self.core.settings
        return asr_pb2.ServerInfo(
            model_id=info.model_id,
            multilingual=info.multilingual,
            device=info.device,
            device_name=info.device_name,
            dtype=info.dtype,
            dtype_reason=info.dtype_reason,
            max_batch_size=s.max_batch_size,
            max_wait_ms=int(s.max_wait_ms),
            max_queue_size=s.max_queue_size,
            max_audio_s=s.max_audio_s,
            server_version=server.__version__,
            torch_version=_version("torch"),
            transformers_version=_version("transformers"),
            max_message_bytes=s.max_message_bytes,
            languages=list(info.languages),
            engine=engine,
            max_active=s.max_active if engine == "continuous" else 0,
            max_streams=s.max_streams,
            max_beam_size=s.max_beam_size,
            max_stream_duration_s=s.max_stream_s,
            stream_buffer_s=s.stream_buffer_s,
            stream_idle_timeout_s=s.stream_idle_timeout_s,
            endpoint_silence_ms=s.endpoint_silence_ms,
            interim_interval_ms=s.interim_interval_ms,
            no_speech_threshold=s.no_speech_threshold,
            silence_dbfs=s.silence_dbfs,
            max_new_tokens=s.max_new_tokens,
            decode_step=getattr(recognizer.batcher, "decode_step", ""),
        )

    def _convert_config(
        self, config: asr_pb2.RecognitionConfig, recognizer: Recognizer
    ) -> tuple[AudioFormat, DecodeOptions]:
        refuse_unserved_fields(config)  # Google's fields asr.v1 lacks: refused, not dropped
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
        _check_text_bounds(config)
        check_model(config.model, recognizer.model.info.model_id)
        if not 0.0 <= config.temperature <= 1.0:
            raise InvalidArgumentError(f"temperature must be in [0, 1], not {config.temperature}")
        max_beam_size = self.core.settings.max_beam_size
        if not 0 <= config.beam_size <= max_beam_size:
            raise InvalidArgumentError(
                f"beam_size must be 0..{max_beam_size}, not {config.beam_size}"
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
        return fmt, options  # the model checks options off the loop (recognizer, stream start)


def _check_text_bounds(config: asr_pb2.RecognitionConfig) -> None:
    for name, value, limit in (
        ("language_code", config.language_code, MAX_LANGUAGE_BYTES),
        ("model", config.model, MAX_MODEL_BYTES),
        ("initial_prompt", config.initial_prompt, MAX_PROMPT_BYTES),
    ):
        size = len(value.encode())
        if size > limit:
            raise InvalidArgumentError(f"{name} is {size} bytes; at most {limit}")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def _timing(t: Timing) -> asr_pb2.ServerTiming:
    return asr_pb2.ServerTiming(
        queue_time=duration(t.queue_s),
        inference_time=duration(t.infer_s),
        total_time=duration(t.total_s),
        batch_size=t.batch_size,
        audio_duration=audio_time(t.audio_s),
        windows=t.windows,
        prepare_time=duration(t.prepare_s),
        wait_time=duration(t.wait_s),
        encode_time=None if t.encode_s is None else duration(t.encode_s),
        decode_time=duration(t.decode_s),
        held_up_time=duration(t.held_s),
    )


def _words(segment: Segment) -> list[asr_pb2.WordInfo]:
    return [
        asr_pb2.WordInfo(
            start_time=audio_time(w.start_s),
            end_time=audio_time(w.end_s),
            word=w.word,
            confidence=w.probability,
        )
        for w in segment.words
    ]


def _result(segment: Segment) -> asr_pb2.SpeechRecognitionResult:
    alternative = asr_pb2.SpeechRecognitionAlternative(
        transcript=segment.text, confidence=segment.confidence, words=_words(segment)
    )
    return asr_pb2.SpeechRecognitionResult(
        alternatives=[alternative],
        result_start_time=audio_time(segment.start_s),
        result_end_time=audio_time(segment.end_s),
        language_code=segment.language,
        no_speech_prob=segment.no_speech_prob,
    )


def _response(result: Recognition) -> asr_pb2.RecognizeResponse:
    return asr_pb2.RecognizeResponse(
        results=[_result(s) for s in result.segments],
        total_billed_time=audio_time(result.timing.audio_s),
        timing=_timing(result.timing),
    )


def _alternative(
    text: str, recognition: Recognition | None
) -> asr_pb2.SpeechRecognitionAlternative:
    if recognition is None:
        return asr_pb2.SpeechRecognitionAlternative(transcript=text)
    words = [w for segment in recognition.segments for w in _words(segment)]
    confidences = [s.confidence for s in recognition.segments]
    return asr_pb2.SpeechRecognitionAlternative(
        transcript=text, confidence=sum(confidences) / len(confidences), words=words
    )


def _stream_response(event: StreamEvent) -> asr_pb2.StreamingRecognizeResponse:
    response = asr_pb2.StreamingRecognizeResponse()
    if event.end_of_single_utterance:
        response.speech_event_type = asr_pb2.StreamingRecognizeResponse.END_OF_SINGLE_UTTERANCE
    if event.timing is not None:
        response.timing.CopyFrom(_timing(event.timing))
    if event.result is not None:
        r = event.result
        response.results.append(
            asr_pb2.StreamingRecognitionResult(
                alternatives=[_alternative(r.text, r.recognition)],
                is_final=r.is_final,
                stability=r.stability,
                result_start_time=audio_time(r.start_s),
                result_end_time=audio_time(r.end_s),
                language_code=r.language,
            )
        )
    return response
