"""`nvidia.riva.asr.RivaSpeechRecognition` over the shared recognizer: Riva's messages in, the
plain types of the speech core (`server.speech`), Riva's messages out.

Riva's client sends the bytes of a WAV file as `LINEAR_PCM` (header included, offline and
streaming alike); the header is read or skipped. Word times are integer milliseconds and
`audio_processed` is seconds of audio up to the end of a result, as Riva reports them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from asr.vendors import riva_asr_pb2 as ra
from asr.vendors import riva_asr_pb2_grpc, riva_audio_pb2
from server.audio import AudioFormat, Encoding
from server.edge import audio_chunks, first_message, time_remaining_s
from server.errors import InvalidArgumentError
from server.models.base import DecodeOptions
from server.recognizer import Segment
from server.speech import SpeechCore, check_model
from server.streaming import StreamEvent
from server.vendors.common import (
    is_wav,
    linear16_chunks,
    primary_language,
    prompt_from_phrases,
    refuse_if,
)

AudioEncoding = riva_audio_pb2.AudioEncoding
SERVICE = ra.DESCRIPTOR.services_by_name["RivaSpeechRecognition"].full_name

_FILES = {
    AudioEncoding.ENCODING_UNSPECIFIED: Encoding.AUTO,
    AudioEncoding.FLAC: Encoding.FLAC,
    AudioEncoding.OGGOPUS: Encoding.OGG,
}
_RAW = {
    AudioEncoding.LINEAR_PCM: Encoding.LINEAR16,
    AudioEncoding.MULAW: Encoding.MULAW,
    AudioEncoding.ALAW: Encoding.ALAW,
}


@dataclass(frozen=True)
class _Request:
    fmt: AudioFormat
    options: DecodeOptions
    language: str


@dataclass
class RivaSpeechServicer(riva_asr_pb2_grpc.RivaSpeechRecognitionServicer):
    core: SpeechCore

    async def Recognize(
        self, request: ra.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> ra.RecognizeResponse:
        if not request.audio:
            raise InvalidArgumentError("audio is required (it is empty)")
        r = self._convert(request.config)
        fmt = r.fmt
        if fmt.encoding in _RAW.values() and is_wav(request.audio):
            fmt = AudioFormat(Encoding.WAV, fmt.sample_rate_hz)
        result = await self.core.recognize(request.audio, fmt, r.options, time_remaining_s(context))
        return ra.RecognizeResponse(
            results=[_result(s, r.language) for s in result.segments], id=request.id
        )

    async def StreamingRecognize(
        self,
        request_iterator: AsyncIterator[ra.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[ra.StreamingRecognizeResponse]:
        with self.core.stream_slot():  # counted and capped from the first byte, as asr.v1's
            async for response in self._stream(request_iterator):
                yield response

    async def _stream(
        self, request_iterator: AsyncIterator[ra.StreamingRecognizeRequest]
    ) -> AsyncIterator[ra.StreamingRecognizeResponse]:
        first = await first_message(request_iterator, self.core.settings.stream_idle_timeout_s)
        if first is None:
            return
        streaming = first.streaming_config
        if streaming.config.encoding not in _RAW:
            raise InvalidArgumentError(
                "streams carry raw audio: set encoding LINEAR_PCM, MULAW or ALAW"
            )
        r = self._convert(streaming.config)
        cfg = self.core.stream_settings(r.fmt, r.options, streaming.interim_results, False)
        chunks = linear16_chunks(audio_chunks(request_iterator), r.fmt.encoding)
        async for event in self.core.stream(chunks, cfg):
            response = _stream_response(event, r.language)
            if response is not None:
                response.id.CopyFrom(first.id)
                yield response

    async def GetRivaSpeechRecognitionConfig(
        self, request: ra.RivaSpeechRecognitionConfigRequest, context: grpc.aio.ServicerContext
    ) -> ra.RivaSpeechRecognitionConfigResponse:
        recognizer = self.core.ready()
        info = recognizer.model.info
        if request.model_name and request.model_name != info.model_id:
            return ra.RivaSpeechRecognitionConfigResponse()
        s = self.core.settings
        parameters = {
            "type": "offline,online",
            "language_code": ",".join(info.languages) if info.multilingual else "en-US",
            "sample_rate": "16000",
            "max_batch_size": str(s.max_batch_size),
            "max_audio_s": f"{s.max_audio_s:g}",
            "engine": recognizer.batcher.engine,
            "device": info.device,
        }
        config = ra.RivaSpeechRecognitionConfigResponse.Config(
            model_name=info.model_id, parameters=parameters
        )
        return ra.RivaSpeechRecognitionConfigResponse(model_config=[config])

    def _convert(self, config: ra.RecognitionConfig) -> _Request:
        recognizer = self.core.ready()
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
        check_model(config.model, recognizer.model.info.model_id)
        options = DecodeOptions(
            language=primary_language(config.language_code),
            prompt=prompt_from_phrases(c.phrases for c in config.speech_contexts),
            word_timestamps=config.enable_word_time_offsets,
        )
        recognizer.model.check_options(options)
        fmt = AudioFormat(encoding, config.sample_rate_hertz, config.audio_channel_count)
        return _Request(fmt, options, config.language_code)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _alternative(
    text: str, segments: list[Segment] | tuple[Segment, ...], language: str
) -> ra.SpeechRecognitionAlternative:
    words = [
        ra.WordInfo(
            start_time=_ms(w.start_s),
            end_time=_ms(w.end_s),
            word=w.word.strip(),
            confidence=w.probability,
            language_code=language or s.language,
        )
        for s in segments
        for w in s.words
    ]
    languages = [language] if language else sorted({s.language for s in segments if s.language})
    confidence = sum(s.confidence for s in segments) / len(segments) if segments else 0.0
    return ra.SpeechRecognitionAlternative(
        transcript=text, confidence=confidence, words=words, language_code=languages
    )


def _result(segment: Segment, language: str) -> ra.SpeechRecognitionResult:
    return ra.SpeechRecognitionResult(
        alternatives=[_alternative(segment.text, [segment], language)],
        audio_processed=segment.end_s,
    )


def _stream_response(event: StreamEvent, language: str) -> ra.StreamingRecognizeResponse | None:
    r = event.result
    if r is None:
        return None
    segments = r.recognition.segments if r.recognition is not None else []
    alternative = _alternative(r.text, segments, language or r.language)
    return ra.StreamingRecognizeResponse(
        results=[
            ra.StreamingRecognitionResult(
                alternatives=[alternative],
                is_final=r.is_final,
                stability=r.stability,
                audio_processed=r.end_s,
            )
        ]
    )
