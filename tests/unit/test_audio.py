"""Audio in: formats, rates, channels, limits, and the windowing of long audio."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import soundfile as sf

from server.audio import (
    SAMPLE_RATE,
    AudioFormat,
    Encoding,
    decode,
    g711_to_linear16,
    split_windows,
)
from server.errors import InvalidAudioError
from tests.conftest import JFK_FLAC, require_data, tone, wav_bytes

LIMIT_S = 600.0


def dominant_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.argmax(spectrum) * SAMPLE_RATE / len(samples))


@pytest.mark.parametrize("rate", [8_000, 16_000, 22_050, 44_100, 48_000])
def test_wav_at_any_rate_comes_out_16k_with_the_same_pitch(rate):
    out = decode(wav_bytes(tone(440, 1.0, rate), rate), AudioFormat(), LIMIT_S)
    assert out.dtype == np.float32
    assert abs(len(out) - SAMPLE_RATE) <= 2
    assert abs(dominant_hz(out) - 440) < 3


def test_resampler_does_not_alias_high_frequencies():
    # 12 kHz is above the 8 kHz Nyquist of 16 kHz audio: a real resampler removes it; naive
    # decimation would fold it down to 4 kHz.
    out = decode(wav_bytes(tone(12_000, 1.0, 48_000), 48_000), AudioFormat(), LIMIT_S)
    assert np.sqrt(np.mean(out**2)) < 0.01


def test_stereo_is_mixed_to_mono():
    left = tone(440, 1.0, 16_000)
    stereo = np.stack([left, -left], axis=1)  # opposite phases cancel when averaged
    out = decode(wav_bytes(stereo, 16_000), AudioFormat(), LIMIT_S)
    assert out.ndim == 1 and np.max(np.abs(out)) < 1e-3


@pytest.mark.parametrize("fmt", ["FLAC", "OGG"])
def test_flac_and_ogg(fmt):
    subtype = "PCM_16" if fmt == "FLAC" else "VORBIS"
    out = decode(wav_bytes(tone(440, 1.0, 16_000), 16_000, subtype, fmt), AudioFormat(), LIMIT_S)
    assert abs(dominant_hz(out) - 440) < 3


def test_linear16_with_rate_and_channels():
    pcm = (tone(440, 1.0, 8_000, channels=2) * 32767).astype("<i2").tobytes()
    out = decode(pcm, AudioFormat(Encoding.LINEAR16, 8_000, 2), LIMIT_S)
    assert abs(len(out) - SAMPLE_RATE) <= 2
    assert abs(dominant_hz(out) - 440) < 3


def test_real_44k_stereo_24bit_flac():
    require_data()
    out = decode(JFK_FLAC.read_bytes(), AudioFormat(), LIMIT_S)
    assert abs(len(out) / SAMPLE_RATE - 11.0) < 0.05


@pytest.mark.parametrize(
    ("content", "fmt", "message"),
    [
        (b"", AudioFormat(), "empty"),
        (b"this is not audio at all" * 10, AudioFormat(), "not a WAV, FLAC, OGG or MP3"),
        (b"\x00\x01" * 100, AudioFormat(Encoding.LINEAR16), "needs sample_rate_hertz"),
        (b"\x00\x01\x02", AudioFormat(Encoding.LINEAR16, 16_000), "not a whole number"),
        (b"\x00\x01" * 10, AudioFormat(Encoding.LINEAR16, 5_000_000), "between"),
        (b"\x00\x01" * 10, AudioFormat(Encoding.LINEAR16, 16_000, 99), "audio_channel_count"),
    ],
)
def test_bad_input_is_named(content, fmt, message):
    with pytest.raises(InvalidAudioError, match=message):
        decode(content, fmt, LIMIT_S)


def test_truncated_header():
    good = wav_bytes(tone(440, 1.0, 16_000), 16_000)
    with pytest.raises(InvalidAudioError):
        decode(good[:30], AudioFormat(), LIMIT_S)


def test_header_rate_mismatch():
    with pytest.raises(InvalidAudioError, match="header says 16000"):
        decode(wav_bytes(tone(440, 1, 16_000), 16_000), AudioFormat(sample_rate_hz=8000), LIMIT_S)


def test_too_long_is_refused_before_decoding():
    pcm = np.zeros(16_000 * 11, dtype="<i2").tobytes()
    with pytest.raises(InvalidAudioError, match="at most 10 s"):
        decode(pcm, AudioFormat(Encoding.LINEAR16, 16_000), 10.0)
    with pytest.raises(InvalidAudioError, match="at most 10 s"):
        decode(wav_bytes(np.zeros(16_000 * 11), 16_000), AudioFormat(), 10.0)


def test_empty_file_with_valid_header():
    with pytest.raises(InvalidAudioError, match="no samples"):
        decode(wav_bytes(np.zeros(0), 16_000), AudioFormat(), LIMIT_S)


def test_short_audio_is_one_window():
    windows = split_windows(np.ones(16_000 * 5, dtype=np.float32))
    assert len(windows) == 1 and windows[0].start_s == 0.0


def test_long_audio_is_cut_at_quiet_points_into_windows_of_at_most_30s():
    rng = np.random.default_rng(0)
    audio = rng.uniform(-0.5, 0.5, 16_000 * 75).astype(np.float32)
    quiet = 16_000 * 27  # a 200 ms pause at 27 s: the first cut must land in it
    audio[quiet : quiet + 3_200] = 0.0
    windows = split_windows(audio)
    assert [w.index for w in windows] == list(range(len(windows)))
    assert all(w.duration_s <= 30.0 for w in windows)
    assert quiet <= windows[1].start_s * 16_000 <= quiet + 3_200
    assert np.array_equal(np.concatenate([w.samples for w in windows]), audio)  # nothing lost
    for prev, nxt in itertools.pairwise(windows):
        assert nxt.start_s == pytest.approx(prev.start_s + prev.duration_s)


@pytest.mark.parametrize(
    ("subtype", "encoding"), [("ULAW", Encoding.MULAW), ("ALAW", Encoding.ALAW)]
)
def test_g711_expands_exactly_like_libsndfile(subtype, encoding):
    every_code = bytes(range(256))
    reference, _ = sf.read(
        io.BytesIO(every_code),
        dtype="int16",
        format="RAW",
        subtype=subtype,
        samplerate=8000,
        channels=1,
    )
    ours = np.frombuffer(g711_to_linear16(every_code, encoding), dtype="<i2")
    assert np.array_equal(ours, reference)


@pytest.mark.parametrize(
    ("subtype", "encoding"), [("ULAW", Encoding.MULAW), ("ALAW", Encoding.ALAW)]
)
def test_raw_g711_decodes_to_16k(subtype, encoding):
    content = wav_bytes(tone(440, 0.5, 8000), 8000, subtype=subtype, fmt="RAW")
    samples = decode(content, AudioFormat(encoding, 8000), 60)
    assert len(samples) == 8000
    assert 0.3 < float(np.abs(samples).max()) < 0.6  # the 0.5 tone, companded and back
    with pytest.raises(InvalidAudioError, match="needs sample_rate_hertz"):
        decode(content, AudioFormat(encoding), 60)
