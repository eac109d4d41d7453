"""Property-based fuzzing (hypothesis): window splitting, stitching of window results, stream
PCM decoding across arbitrary chunk boundaries, and the runaway-loop check."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from server.audio import SAMPLE_RATE, split_windows
from server.models.base import WindowResult, Word
from server.models.runaway import LOOP_SPAN, loop_period, trim_loop
from server.recognizer import _segment
from server.streaming import PcmDecoder, StreamSettings

FAST = settings(max_examples=60, deadline=None)

audio = arrays(
    np.float32,
    st.integers(0, 95 * SAMPLE_RATE),
    elements=st.floats(-1, 1, width=32),
    fill=st.just(np.float32(0.0)),
)


@FAST
@given(samples=audio, window_s=st.floats(6.0, 30.0), search_s=st.floats(0.5, 5.0))
def test_windows_cover_the_audio_in_order_and_fit(samples, window_s, search_s):
    windows = split_windows(samples, window_s, search_s)
    assert np.array_equal(np.concatenate([w.samples for w in windows]), samples)
    assert all(w.duration_s <= window_s + 1e-9 for w in windows)
    assert [w.index for w in windows] == list(range(len(windows)))
    position = 0
    for w in windows:
        assert w.start_s == position / SAMPLE_RATE
        position += len(w.samples)


@FAST
@given(
    samples=audio,
    offset_s=st.floats(0, 3600),
    word_times=st.lists(st.tuples(st.floats(0, 30), st.floats(0, 30)), max_size=5),
)
def test_stitched_segments_keep_their_windows_times(samples, offset_s, word_times):
    words = tuple(Word("w", min(a, b), max(a, b)) for a, b in word_times)
    previous_end = offset_s
    for window in split_windows(samples):
        segment = _segment(window, WindowResult(" text ", "en", words=words), offset_s)
        assert segment.text == "text"
        assert segment.start_s == previous_end or abs(segment.start_s - previous_end) < 1e-6
        assert abs(segment.end_s - segment.start_s - window.duration_s) < 1e-6
        for word, original in zip(segment.words, words, strict=True):
            assert abs(word.start_s - (original.start_s + segment.start_s)) < 1e-6
        previous_end = segment.end_s


@FAST
@given(
    pcm=st.binary(max_size=4000),
    cuts=st.lists(st.integers(0, 4000), max_size=10),
    channels=st.integers(1, 3),
)
def test_pcm_decoding_does_not_depend_on_chunk_boundaries(pcm, cuts, channels):
    cfg = StreamSettings(sample_rate_hz=16_000, channels=channels)
    whole = PcmDecoder(cfg).decode(pcm, last=True)
    decoder = PcmDecoder(cfg)
    bounds = [0, *sorted(c for c in cuts if c <= len(pcm)), len(pcm)]
    parts = [decoder.decode(pcm[a:b]) for a, b in itertools.pairwise(bounds)]
    parts.append(decoder.decode(b"", last=True))
    assert np.array_equal(np.concatenate(parts), whole)


tokens = st.lists(st.integers(0, 6), max_size=120)


@FAST
@given(prefix=tokens, phrase=st.lists(st.integers(0, 6), min_size=1, max_size=16))
def test_a_loop_is_found_and_trimmed_to_its_phrase_once(prefix, phrase):
    looped = prefix + phrase * (LOOP_SPAN // len(phrase) + 2)
    period = loop_period(looped)
    assert period is not None and period <= len(phrase)
    trimmed = trim_loop(looped)
    assert looped[: len(trimmed)] == trimmed  # a prefix: nothing invented
    assert len(trimmed) <= len(prefix) + len(phrase)
    # What was cut is the loop's phrase over and over, nothing else.
    assert all(looped[i] == looped[i - period] for i in range(len(trimmed), len(looped)))


@FAST
@given(seq=tokens)
def test_trimming_only_ever_shortens_and_keeps_what_does_not_loop(seq):
    trimmed = trim_loop(seq)
    assert seq[: len(trimmed)] == trimmed
    if loop_period(seq) is None:
        assert trimmed == seq
