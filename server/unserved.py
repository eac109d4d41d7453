"""Google Cloud Speech fields that asr.v1 does not serve: refused by name, never dropped.

asr.v1's RecognitionConfig keeps Google's field names and numbers, so a Google-shaped message
decodes as asr.v1. The numbers of Google's fields that asr.v1 lacks are reserved in asr.proto;
protobuf keeps what a client sent under them as unknown fields, and this check refuses them with
what to use instead, as the Google and Riva APIs on the same port do, rather than serve a
request whose client believes it asked for something it won't get.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from server.errors import InvalidArgumentError

# Google's field number -> (its name, why not / what to use instead).
UNSERVED_CONFIG_FIELDS: dict[int, tuple[str, str]] = {
    5: ("profanity_filter", "Whisper's text is not filtered"),
    6: ("speech_contexts", "use initial_prompt for the words and spellings the audio contains"),
    12: (
        "enable_separate_recognition_per_channel",
        "channels are mixed down to mono; send each channel as a request of its own",
    ),
    15: (
        "enable_word_confidence",
        "words carry no confidence; enable_word_time_offsets gives their times",
    ),
    19: ("diarization_config", "there is no speaker diarization"),
}


def refuse_unserved_fields(config: Message) -> None:
    """INVALID_ARGUMENT for the first Google field asr.v1 does not serve that `config` (an
    asr.v1.RecognitionConfig) carries."""
    # Iterable in both protobuf back ends; typed only in the pure-Python one.
    unknown_fields = cast(Iterable[Any], UnknownFieldSet(config))
    for unknown in unknown_fields:
        if unknown.field_number in UNSERVED_CONFIG_FIELDS:
            name, instead = UNSERVED_CONFIG_FIELDS[unknown.field_number]
            raise InvalidArgumentError(
                f"config.{name} (field {unknown.field_number}) is not supported by asr.v1: "
                f"{instead}"
            )
