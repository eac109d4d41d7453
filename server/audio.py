"""Audio in: decode, downmix, resample to 16 kHz, and cut long audio into <= 30 s windows.

Pure functions on bytes and numpy arrays, CPU-bound: the servicer calls them in a worker
thread, never on the event loop. Limits are checked before the expensive work (the duration
is read from the header or the byte count before anything is decoded).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from enum import Enum

import numpy as np
import soundfile as sf
import soxr

from server.errors import InvalidAudioError

SAMPLE_RATE = 16_000
WINDOW_S = 30.0
MIN_RATE_HZ = 1_000
MAX_RATE_HZ = 384_000
MAX_CHANNELS = 32


class Encoding(Enum):
    """How the bytes are encoded; mirrors the proto enum without importing it."""

    AUTO = "auto"  # a self-describing file: WAV, FLAC, OGG
    LINEAR16 = "linear16"
    FLAC = "flac"
    WAV = "wav"
    OGG = "ogg"
    MULAW = "mulaw"  # raw G.711 mu-law, 8 bits a sample, no header (telephony)
    ALAW = "alaw"  # raw G.711 A-law, 8 bits a sample, no header


@dataclass(frozen=True)
class AudioFormat:
    """What the client says about its bytes."""

    encoding: Encoding = Encoding.AUTO
    sample_rate_hz: int = 0  # 0 = take it from the header
    channels: int = 0  # 0 = take it from the header (1 for LINEAR16)


@dataclass(frozen=True)
class Window:
    """A slice of 16 kHz mono audio of at most 30 s, with its place in the whole."""

    index: int
    start_s: float
    samples: np.ndarray

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def decode(content: bytes, fmt: AudioFormat, max_duration_s: float) -> np.ndarray:
    """Bytes -> float32 mono 16 kHz samples in [-1, 1]. Raises InvalidAudioError."""
    if not content:
        raise InvalidAudioError("audio is empty: RecognitionAudio.content has no bytes")
    if fmt.encoding is Encoding.LINEAR16:
        samples, rate = _decode_linear16(content, fmt, max_duration_s)
    elif fmt.encoding in G711:
        pcm16 = g711_to_linear16(content, fmt.encoding)
        samples, rate = _decode_linear16(pcm16, fmt, max_duration_s)
    else:
        samples, rate = _decode_file(content, fmt, max_duration_s)
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if rate != SAMPLE_RATE:
        # soxr's HQ band-limited resampler: naive decimation would alias speech energy above
        # 8 kHz down into the band Whisper listens to.
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return mono


def _g711_tables() -> dict[Encoding, np.ndarray]:
    """The 256-entry expansion tables of ITU-T G.711 (what libsndfile and sox use)."""
    code = np.arange(256, dtype=np.int32)
    u = ~code & 0xFF  # mu-law bytes are sent inverted
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 7)
    mulaw = np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84)
    a = code ^ 0x55  # A-law inverts every other bit
    exponent, mantissa = (a >> 4) & 7, a & 0x0F
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0)
    )
    alaw = np.where(a & 0x80, magnitude, -magnitude)
    return {Encoding.MULAW: mulaw.astype("<i2"), Encoding.ALAW: alaw.astype("<i2")}


G711 = _g711_tables()


def g711_to_linear16(content: bytes, encoding: Encoding) -> bytes:
    """Raw mu-law or A-law bytes -> LINEAR16 bytes (one 8-bit code is one sample, so any
    chunk boundary is a sample boundary: streams convert chunk by chunk)."""
    return G711[encoding][np.frombuffer(content, dtype=np.uint8)].tobytes()


def _check_rate(rate: int) -> None:
    if not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
        raise InvalidAudioError(
            f"sample_rate_hertz must be between {MIN_RATE_HZ} and {MAX_RATE_HZ}, not {rate}"
        )


def _check_duration(duration_s: float, max_duration_s: float) -> None:
    if duration_s > max_duration_s:
        raise InvalidAudioError(
            f"audio is {duration_s:.1f} s long; this server accepts at most {max_duration_s:g} s"
        )


def _decode_linear16(
    content: bytes, fmt: AudioFormat, max_duration_s: float
) -> tuple[np.ndarray, int]:
    if fmt.sample_rate_hz <= 0:
        raise InvalidAudioError(
            f"{fmt.encoding.name} audio needs sample_rate_hertz (it has no header)"
        )
    _check_rate(fmt.sample_rate_hz)
    channels = fmt.channels or 1
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidAudioError(f"audio_channel_count must be 1..{MAX_CHANNELS}, not {channels}")
    frame_bytes = 2 * channels
    if len(content) % frame_bytes:
        raise InvalidAudioError(
            f"LINEAR16 audio has {len(content)} bytes, not a whole number of "
            f"{channels}-channel 16-bit frames ({frame_bytes} bytes each)"
        )
    _check_duration(len(content) / frame_bytes / fmt.sample_rate_hz, max_duration_s)
    pcm = np.frombuffer(content, dtype="<i2").reshape(-1, channels)
    return pcm.astype(np.float32) / 32768.0, fmt.sample_rate_hz


def _decode_file(content: bytes, fmt: AudioFormat, max_duration_s: float) -> tuple[np.ndarray, int]:
    try:
        info = sf.info(io.BytesIO(content))
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise InvalidAudioError(
            f"could not read the audio header: not a WAV, FLAC or OGG file, or truncated ({err})"
        ) from err
    if fmt.sample_rate_hz and fmt.sample_rate_hz != info.samplerate:
        raise InvalidAudioError(
            f"sample_rate_hertz is {fmt.sample_rate_hz} but the file's header says "
            f"{info.samplerate}; send 0 to use the header's rate"
        )
    _check_rate(info.samplerate)
    if info.frames <= 0:
        raise InvalidAudioError("audio file contains no samples")
    _check_duration(info.frames / info.samplerate, max_duration_s)
    try:
        data, rate = sf.read(io.BytesIO(content), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise InvalidAudioError(f"could not decode the audio: {err}") from err
    if len(data) == 0:
        raise InvalidAudioError("audio file contains no samples (truncated?)")
    return data, int(rate)


def split_windows(
    samples: np.ndarray, window_s: float = WINDOW_S, search_s: float = 5.0
) -> list[Window]:
    """Cut audio into windows of at most `window_s`, each cut at the quietest 20 ms frame of the
    last `search_s` seconds of its window, so that a cut falls between words, not inside one."""
    window = int(window_s * SAMPLE_RATE)
    if len(samples) <= window:
        return [Window(0, 0.0, samples)]
    windows: list[Window] = []
    start = 0
    while len(samples) - start > window:
        cut = quietest_cut(samples, start + window - int(search_s * SAMPLE_RATE), start + window)
        windows.append(Window(len(windows), start / SAMPLE_RATE, samples[start:cut]))
        start = cut
    windows.append(Window(len(windows), start / SAMPLE_RATE, samples[start:]))
    return windows


def quietest_cut(samples: np.ndarray, lo: int, hi: int, frame: int = 320) -> int:
    region = samples[lo:hi]
    n_frames = len(region) // frame
    if n_frames == 0:
        return hi
    energy = np.square(region[: n_frames * frame].reshape(n_frames, frame)).mean(axis=1)
    # The middle of the quietest frame: never hi itself, so every window is <= window_s.
    return lo + int(np.argmin(energy)) * frame + frame // 2
