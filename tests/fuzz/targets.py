"""Coverage-guided fuzz targets (atheris) over what a client controls byte for byte: audio
decoding and request conversion. A target returns normally or raises the error a client is
meant to get (InvalidArgumentError and its subclasses); anything else is a find.

    python -m tests.fuzz.targets audio -runs=2000 CORPUS_DIR     # a bounded pass
    make fuzz-long                                               # hours, both targets

Every find becomes a file in tests/fuzz/regressions/<target>/, replayed by
tests/unit/test_fuzz.py on every `make test`.
"""

from __future__ import annotations

import sys
from typing import Any

import atheris

with atheris.instrument_imports():
    from google.protobuf.message import DecodeError

    from asr.v1 import asr_pb2
    from server.audio import AudioFormat, Encoding, decode, split_windows
    from server.errors import InvalidArgumentError
    from server.servicer import SpeechServicer

MAX_AUDIO_S = 30.0
_ENCODINGS = list(Encoding)


def audio(data: bytes) -> None:
    """Bytes -> decode(), with the format fields drawn from the input too."""
    fdp = atheris.FuzzedDataProvider(data)
    encoding = _ENCODINGS[fdp.ConsumeIntInRange(0, len(_ENCODINGS) - 1)]
    rate = fdp.PickValueInList([0, 8_000, 16_000, 44_100, 1, 999_999, -1])
    channels = fdp.PickValueInList([0, 1, 2, 33])
    content = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        samples = decode(content, AudioFormat(encoding, rate, channels), MAX_AUDIO_S)
    except InvalidArgumentError:
        return
    assert samples.dtype.name == "float32" and samples.ndim == 1
    assert len(samples) <= MAX_AUDIO_S * 16_000 + 16
    assert bool((abs(samples) <= 1.0).all())
    split_windows(samples)


class _Model:
    class info:  # mimics ModelInfo
        model_id = "fake"


class _Recognizer:
    model = _Model()


_SERVICER: Any = SpeechServicer.__new__(SpeechServicer)  # only its core's settings are read


def request(data: bytes) -> None:
    """Bytes as a RecognizeRequest (as gRPC would parse them) -> the servicer's conversion."""
    from server.config import Settings
    from server.speech import SpeechCore

    _SERVICER.core = SpeechCore.__new__(SpeechCore)
    _SERVICER.core.settings = Settings()
    message = asr_pb2.RecognizeRequest()
    try:
        message.ParseFromString(data)
    except DecodeError:
        return
    try:
        _SERVICER._convert_config(message.config, _Recognizer())
    except InvalidArgumentError as err:
        assert len(str(err)) < 1024, "an error message must stay short"


TARGETS = {"audio": audio, "request": request}


def main(argv: list[str]) -> None:
    target = TARGETS[argv[1]]
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
