"""`google.cloud.speech.v1.Speech` over the shared recognizer: Google's messages in, the plain
types of the speech core (`server.speech`), Google's messages out.

Google's clients send `language_code` as "en-US", expect `result_end_time` offsets, word
times as Durations, and INVALID_ARGUMENT with a message for a bad request; all of that is
here. `LongRunningRecognize` answers with an Operation that is already done, so a client's
`operation.result()` returns without polling (no Operations service is needed).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from google.longrunning import operations_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from asr.vendors import google_speech_pb2 as gs
from asr.vendors import google_speech_pb2_grpc
from server.audio import AudioFormat, Encoding
from server.edge import audio_chunks, duration, first_message, time_remaining_s
from server.errors import InvalidArgumentError
from server.models.base import DecodeOptions
from server.recognizer import Recognition, Segment
from server.speech import SpeechCore, check_model
from server.streaming import StreamEvent
from server.vendors.common import (
    is_wav,
    linear16_chunks,
    primary_language,
    prompt_from_phrases,
    refuse_if,
)

Config = gs.RecognitionConfig
SERVICE = gs.DESCRIPTOR.services_by_name["Speech"].full_name

# Files whose header says rate and channels.
_FILES = {
    Config.ENCODING_UNSPECIFIED: Encoding.AUTO,
    Config.FLAC: Encoding.FLAC,
    Config.OGG_OPUS: Encoding.OGG,
    Config.MP3: Encoding.AUTO,
}
# Raw samples without a header (the only encodings a stream can carry).
_RAW = {Config.LINEAR16: Encoding.LINEAR16, Config.MULAW: Encoding.MULAW}
_REFUSED = {
    Config.AMR: "no AMR decoder here; send LINEAR16, FLAC or OGG_OPUS",
    Config.AMR_WB: "no AMR-WB decoder here; send LINEAR16, FLAC or OGG_OPUS",
    Config.SPEEX_WITH_HEADER_BYTE: "no Speex decoder here; send OGG_OPUS",
    Config.WEBM_OPUS: "no WebM demuxer here; send the same Opus audio in Ogg (OGG_OPUS)",
}
# Google's model names: accepted (a client's code may name one) and served by the one model.
GOOGLE_MODELS = frozenset(
    {
        "default",
        "latest_long",
        "latest_short",
        "command_and_search",
        "phone_call",
        "video",
        "telephony",
        "telephony_short",
    }
)


@dataclass(frozen=True)
class _Request:
    fmt: AudioFormat
    options: DecodeOptions
    language: str  # the code to echo in results ("" -> what the model detected)


@dataclass
class GoogleSpeechServicer(google_speech_pb2_grpc.SpeechServicer):
    core: SpeechCore

    async def Recognize(
        self, request: gs.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> gs.RecognizeResponse:
        result, language = await self._recognize(request.config, request.audio, context)
        return gs.RecognizeResponse(
            results=[_result(s, language) for s in result.segments],
            total_billed_time=duration(result.timing.audio_s),
        )

    async def LongRunningRecognize(
        self, request: gs.LongRunningRecognizeRequest, context: grpc.aio.ServicerContext
    ) -> operations_pb2.Operation:
        started = Timestamp()
        started.GetCurrentTime()
        result, language = await self._recognize(request.config, request.audio, context)
        finished = Timestamp()
        finished.GetCurrentTime()
        operation = operations_pb2.Operation(name=f"whisper-grpc-{uuid.uuid4().hex}", done=True)
        operation.response.Pack(
            gs.LongRunningRecognizeResponse(
                results=[_result(s, language) for s in result.segments],
                total_billed_time=duration(result.timing.audio_s),
            )
        )
        operation.metadata.Pack(
            gs.LongRunningRecognizeMetadata(
                progress_percent=100, start_time=started, last_update_time=finished
            )
        )
        return operation

    async def StreamingRecognize(
        self,
        request_iterator: AsyncIterator[gs.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[gs.StreamingRecognizeResponse]:
        with self.core.stream_slot():  # counted and capped from the first byte, as asr.v1's
            async for response in self._stream(request_iterator):
                yield response

    async def _stream(
        self, request_iterator: AsyncIterator[gs.StreamingRecognizeRequest]
    ) -> AsyncIterator[gs.StreamingRecognizeResponse]:
        first = await first_message(request_iterator, self.core.settings.stream_idle_timeout_s)
        if first is None:
            return
        streaming = first.streaming_config
        if not streaming.HasField("config"):
            raise InvalidArgumentError("streaming_config.config is required (it is empty)")
        if streaming.config.encoding not in _RAW:
            raise InvalidArgumentError("streams carry raw audio: set encoding LINEAR16 or MULAW")
        r = self._convert(streaming.config)
        cfg = self.core.stream_settings(
            r.fmt, r.options, streaming.interim_results, streaming.single_utterance
        )
        chunks = linear16_chunks(audio_chunks(request_iterator), r.fmt.encoding)
        async for event in self.core.stream(chunks, cfg):
            response = _stream_response(event, r.language)
            if response is not None:
                yield response

    async def _recognize(
        self,
        config: gs.RecognitionConfig,
        audio: gs.RecognitionAudio,
        context: grpc.aio.ServicerContext,
    ) -> tuple[Recognition, str]:
        if audio.WhichOneof("audio_source") == "uri":
            raise InvalidArgumentError(
                "audio.uri is not supported: this server reads no Cloud Storage; send the bytes "
                "in audio.content"
            )
        if not audio.content:
            raise InvalidArgumentError("audio.content is required")
        r = self._convert(config)
        fmt = r.fmt
        if fmt.encoding in (Encoding.LINEAR16, Encoding.MULAW) and is_wav(audio.content):
            fmt = AudioFormat(Encoding.WAV, fmt.sample_rate_hz)  # Google reads WAV headers too
        return await self.core.recognize(
            audio.content, fmt, r.options, time_remaining_s(context)
        ), r.language

    def _convert(self, config: gs.RecognitionConfig) -> _Request:
        recognizer = self.core.ready()
        if config.encoding in _REFUSED:
            raise InvalidArgumentError(f"encoding is not supported: {_REFUSED[config.encoding]}")
        encoding = _FILES.get(config.encoding) or _RAW.get(config.encoding)
        if encoding is None:
            raise InvalidArgumentError(f"unknown audio encoding {config.encoding}")
        if config.sample_rate_hertz < 0 or config.audio_channel_count < 0:
            raise InvalidArgumentError("sample_rate_hertz and audio_channel_count must be >= 0")
        refuse_if(
            config.enable_separate_recognition_per_channel,
            "enable_separate_recognition_per_channel",
            "channels are mixed down to mono and recognised once",
        )
        refuse_if(config.profanity_filter, "profanity_filter", "Whisper's text is not filtered")
        refuse_if(
            config.diarization_config.enable_speaker_diarization,
            "diarization_config.enable_speaker_diarization",
            "there is no speaker diarization",
        )
        check_model(config.model, recognizer.model.info.model_id, GOOGLE_MODELS)
        options = DecodeOptions(
            language=primary_language(config.language_code),
            prompt=prompt_from_phrases(c.phrases for c in config.speech_contexts),
            word_timestamps=config.enable_word_time_offsets or config.enable_word_confidence,
        )
        recognizer.model.check_options(options)
        fmt = AudioFormat(encoding, config.sample_rate_hertz, config.audio_channel_count)
        return _Request(fmt, options, config.language_code)


def _words(segments: list[Segment] | tuple[Segment, ...]) -> list[gs.WordInfo]:
    return [
        gs.WordInfo(
            start_time=duration(w.start_s),
            end_time=duration(w.end_s),
            word=w.word.strip(),
            confidence=w.probability,
        )
        for s in segments
        for w in s.words
    ]


def _result(segment: Segment, language: str) -> gs.SpeechRecognitionResult:
    alternative = gs.SpeechRecognitionAlternative(
        transcript=segment.text, confidence=segment.confidence, words=_words([segment])
    )
    return gs.SpeechRecognitionResult(
        alternatives=[alternative],
        result_end_time=duration(segment.end_s),
        language_code=language or segment.language,
    )


def _stream_response(event: StreamEvent, language: str) -> gs.StreamingRecognizeResponse | None:
    response = gs.StreamingRecognizeResponse()
    if event.end_of_single_utterance:
        response.speech_event_type = gs.StreamingRecognizeResponse.END_OF_SINGLE_UTTERANCE
    r = event.result
    if r is not None:
        alternative = gs.SpeechRecognitionAlternative(transcript=r.text)
        if r.recognition is not None and r.recognition.segments:
            segments = r.recognition.segments
            alternative.confidence = sum(s.confidence for s in segments) / len(segments)
            alternative.words.extend(_words(segments))
        response.results.append(
            gs.StreamingRecognitionResult(
                alternatives=[alternative],
                is_final=r.is_final,
                stability=r.stability,
                result_end_time=duration(r.end_s),
                language_code=language or r.language,
            )
        )
        if r.is_final:
            response.total_billed_time.CopyFrom(duration(r.end_s))
    if not response.results and not event.end_of_single_utterance:
        return None
    return response
