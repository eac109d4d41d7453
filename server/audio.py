"""Audio in: decode, downmix, resample to 16 kHz, and cut long audio into <= 30 s windows.

Pure functions on bytes and numpy arrays, CPU-bound: the servicer calls them in a worker
thread, never on the event loop. Limits are checked before the expensive work (the duration
is read from the header or the byte count before anything is decoded).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from enum import Enum

import numpy as np
import soundfile as sf
import soxr

from server.errors import InvalidAudioError, clip

SAMPLE_RATE = 16_000
WINDOW_S = 30.0
MIN_RATE_HZ = 1_000
MAX_RATE_HZ = 384_000
MAX_CHANNELS = 32
# Input samples (all channels) decoded per second of `max_audio_s`: 192 kHz stereo, or 48 kHz
# with 8 channels, may be as long as the limit; more channels or a higher rate, shorter.
MAX_WORK_SAMPLES_PER_S = 384_000
BLOCK_SAMPLES = 1 << 18  # samples (all channels) decoded at a time: 1 MiB of float32
UNKNOWN_LENGTH = 1 << 40  # libsndfile's frame count for a FLAC whose header leaves it out
UNKNOWN_LENGTH_BLOCK = 4096  # frames per read of such a file (a common FLAC block size)


class Encoding(Enum):
    """How the bytes are encoded; mirrors the proto enum without importing it."""

    AUTO = "auto"  # a self-describing file: WAV, FLAC, OGG or MP3
    LINEAR16 = "linear16"
    FLAC = "flac"
    WAV = "wav"
    OGG = "ogg"
    MULAW = "mulaw"  # raw G.711 mu-law, 8 bits a sample, no header (telephony)
    ALAW = "alaw"  # raw G.711 A-law, 8 bits a sample, no header


# The containers (libsndfile's format names) each encoding accepts; libsndfile reads more
# (AIFF, AU, CAF...), which the contract doesn't promise, so they are refused.
_WAV = frozenset({"WAV", "WAVEX", "RF64"})
CONTAINERS: dict[Encoding, frozenset[str]] = {
    Encoding.FLAC: frozenset({"FLAC"}),
    Encoding.WAV: _WAV,
    Encoding.OGG: frozenset({"OGG"}),
    Encoding.AUTO: _WAV | {"FLAC", "OGG", "MPEG", "MP3"},  # libsndfile names MP3 either way
}


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
        return _decode_file(content, fmt, max_duration_s)  # in bounded blocks, mono 16 kHz
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if rate != SAMPLE_RATE:
        # soxr's HQ band-limited resampler: naive decimation would alias speech energy above
        # 8 kHz down into the band Whisper listens to.
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
        mono = np.clip(mono, -1.0, 1.0)  # band-limiting rings a little past full scale
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


def _decode_file(content: bytes, fmt: AudioFormat, max_duration_s: float) -> np.ndarray:
    """A self-describing file -> 16 kHz mono, decoded, mixed down and resampled one block at
    a time: memory is the 16 kHz output plus one block, whatever rate and channel count the
    header declares (a constant-sample FLAC of a few KB may declare 8 channels at 384 kHz)."""
    try:
        f = sf.SoundFile(io.BytesIO(content))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise InvalidAudioError(
            "could not read the audio header: not a WAV, FLAC, OGG or MP3 file, or truncated"
            f" ({_libsndfile_reason(err)})"
        ) from err
    with f:
        _check_header(f, fmt, max_duration_s)
        return _decode_blocks(f, max_duration_s)


def _check_header(f: sf.SoundFile, fmt: AudioFormat, max_duration_s: float) -> None:
    """Everything the header says, checked before a single sample is decoded."""
    container = str(f.format)
    allowed = CONTAINERS[fmt.encoding]
    if container not in allowed:
        wanted = "WAV, FLAC, OGG or MP3" if fmt.encoding is Encoding.AUTO else fmt.encoding.name
        raise InvalidAudioError(
            f"the audio is {container}, not {wanted}: set encoding to match the bytes "
            "(or leave it unspecified for WAV, FLAC, OGG and MP3 files)"
        )
    if fmt.sample_rate_hz and fmt.sample_rate_hz != f.samplerate:
        raise InvalidAudioError(
            f"sample_rate_hertz is {fmt.sample_rate_hz} but the file's header says "
            f"{f.samplerate}; send 0 to use the header's rate"
        )
    if fmt.channels and fmt.channels != f.channels:
        raise InvalidAudioError(
            f"audio_channel_count is {fmt.channels} but the file's header says {f.channels}; "
            "send 0 to use the header's count"
        )
    _check_rate(f.samplerate)
    if not 1 <= f.channels <= MAX_CHANNELS:
        raise InvalidAudioError(f"audio has {f.channels} channels; at most {MAX_CHANNELS}")
    if f.frames <= 0:
        raise InvalidAudioError("audio file contains no samples")
    if f.frames < UNKNOWN_LENGTH:  # a FLAC may leave its length out: counted while decoding
        _check_duration(f.frames / f.samplerate, max_duration_s)
        _check_work(f.frames * f.channels, max_duration_s)


def _decode_blocks(f: sf.SoundFile, max_duration_s: float) -> np.ndarray:
    rate, channels = int(f.samplerate), int(f.channels)
    unknown_length = f.frames >= UNKNOWN_LENGTH
    # libsndfile fails a read that runs past the end of a FLAC of unknown length (and the
    # decoder is lost after it): such files are read in FLAC-frame-sized blocks, and the
    # failing read at the end drops at most one block of the tail.
    block = UNKNOWN_LENGTH_BLOCK if unknown_length else max(1, BLOCK_SAMPLES // channels)
    resampler = (
        None
        if rate == SAMPLE_RATE
        # soxr's HQ band-limited resampler: naive decimation would alias speech energy above
        # 8 kHz down into the band Whisper listens to.
        else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    )
    pieces: list[np.ndarray] = []
    frames, last = 0, False
    while not last:
        try:
            # buffer_read, not read: read() asks for the position first, which libsndfile
            # can't tell for a FLAC of unknown length.
            raw = f.buffer_read(block, dtype="float32")
        # soundfile asserts that a read got the frames it asked for: a broken MP3 stream
        # (found by the fuzz pass) trips that, and is bad audio like any other.
        except (sf.LibsndfileError, RuntimeError, AssertionError) as err:
            if unknown_length and frames:
                break
            raise InvalidAudioError(
                f"could not decode the audio: {_libsndfile_reason(err)}"
            ) from err
        data = np.frombuffer(raw, dtype=np.float32).reshape(-1, channels)
        last = len(data) < block
        frames += len(data)
        _check_duration(frames / rate, max_duration_s)
        _check_work(frames * channels, max_duration_s)
        mono = _clean(data.mean(axis=1) if channels > 1 else data[:, 0], frames, rate)
        if resampler is not None:
            # Band-limiting rings a little past full scale next to a clipped edge.
            mono = np.clip(resampler.resample_chunk(mono, last=last), -1.0, 1.0)
        pieces.append(np.ascontiguousarray(mono, dtype=np.float32))
    if resampler is not None and not last:  # the failed read of an unknown length's end
        pieces.append(np.clip(resampler.resample_chunk(np.zeros(0, np.float32), last=True), -1, 1))
    if frames == 0:
        raise InvalidAudioError("audio file contains no samples (truncated?)")
    return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


def _clean(mono: np.ndarray, frames: int, rate: int) -> np.ndarray:
    """Float files may hold NaN, infinities or values far beyond full scale: NaN or infinity
    is refused (no sound has them), the rest is clipped to [-1, 1], as an ADC would."""
    if not np.isfinite(mono).all():
        raise InvalidAudioError(
            f"audio has NaN or infinite samples (in the block ending at {frames / rate:.1f} s)"
        )
    return np.clip(mono, -1.0, 1.0)


def _check_work(samples: int, max_duration_s: float) -> None:
    """Decoding cost grows with rate x channels x duration: bound their product, so a short
    file can't declare 8 channels at 384 kHz for the longest allowed duration."""
    budget = int(max_duration_s * MAX_WORK_SAMPLES_PER_S)
    if samples > budget:
        raise InvalidAudioError(
            f"audio holds more than {budget} samples (rate x channels x duration); this "
            f"server decodes at most {MAX_WORK_SAMPLES_PER_S} samples per second of its "
            f"{max_duration_s:g} s limit: send fewer channels or a lower rate"
        )


def _libsndfile_reason(err: BaseException) -> str:
    """libsndfile's own words, without the Python reprs (object addresses) around them."""
    reason = getattr(err, "error_string", None) or str(err) or "the stream is corrupt"
    return clip(re.sub(r"<[^>]*>", "the audio", str(reason)), 200)


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
