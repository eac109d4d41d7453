"""The vendors' own Python clients (google-cloud-speech, nvidia-riva-client), unchanged but for
the endpoint, against a real server on loopback with real tiny.en weights and real LibriSpeech:
same transcripts as our own API, their shapes, their errors.

The clients run in `vendor_client.py`, a process of their own (see its docstring for why);
the server is the session's in-process `real_server`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadgen.wer import word_error_rate
from tests.conftest import librispeech_items, require_data
from tests.integration.test_recognize_real import transcribe_all
from tests.integration.test_streaming_real import finals_text, run

DRIVER = Path(__file__).with_name("vendor_client.py")
PACE = 4.0  # streams are sent at 4x real time: fast, and still slow enough for interims
WER_MARGIN = 0.02


def drive(server, tmp_path: Path, api: str, call: str, files: list[Path], **extra) -> list[dict]:
    job = {"api": api, "call": call, "address": server.address, "work": str(tmp_path)}
    job |= {"files": [str(f) for f in files], **extra}
    done = subprocess.run(
        [sys.executable, str(DRIVER)],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def corpus():
    """test-clean (7 files) and the first 3 of test-other: (paths, references)."""
    require_data()
    items = librispeech_items("test-clean") + librispeech_items("test-other")[:3]
    return [p for _, p, _ in items], [ref for _, _, ref in items]


@pytest.fixture(scope="module")
def clean():
    require_data()
    items = librispeech_items("test-clean")
    return [p for _, p, _ in items], [ref for _, _, ref in items]


@pytest.fixture(scope="module")
def ours_unary(real_server, corpus) -> list[str]:
    responses = transcribe_all(real_server, corpus[0], concurrency=4)
    return [" ".join(r.alternatives[0].transcript for r in resp.results) for resp in responses]


@pytest.fixture(scope="module")
def ours_unary_wer(corpus, ours_unary) -> float:
    return word_error_rate(corpus[1], ours_unary)


@pytest.fixture(scope="module")
def ours_stream_wer(real_server, clean) -> float:
    import soundfile as sf

    paths, refs = clean
    stub = real_server.stub()
    texts = [finals_text(run(stub, sf.read(p, dtype="float32")[0])[0]) for p in paths]
    return word_error_rate(refs, texts)


def test_google_recognize_matches_our_api(real_server, tmp_path, corpus, ours_unary_wer):
    paths, refs = corpus
    got = drive(real_server, tmp_path, "google", "unary", paths, words=True)
    wer = word_error_rate(refs, [g["text"] for g in got])
    print(f"google Recognize WER {wer:.3f}, asr.v1 {ours_unary_wer:.3f}")
    assert abs(wer - ours_unary_wer) <= WER_MARGIN
    first = got[0]
    assert first["language"] == ["en-US"]  # echoed as sent, like Google does
    assert 0.5 < first["confidence"][0] <= 1.0
    words = first["words"]
    assert len(words) >= len(refs[0].split()) - 2
    starts = [w[1] for w in words]
    assert starts == sorted(starts) and all(w[2] >= w[1] for w in words)
    assert abs(first["end_s"][-1] - words[-1][2]) < 1.0


def test_google_long_running_recognize_is_done_at_once(real_server, tmp_path, corpus, ours_unary):
    paths, _ = corpus
    got = drive(real_server, tmp_path, "google", "longrunning", paths[:2])
    # operation.result() returned without polling, with what our own Recognize says.
    assert word_error_rate(ours_unary[:2], [g["text"] for g in got]) <= WER_MARGIN


def test_google_streaming_with_interim_results(real_server, tmp_path, clean, ours_stream_wer):
    paths, refs = clean
    got = drive(real_server, tmp_path, "google", "stream", paths, pace=PACE)
    wer = word_error_rate(refs, [g["text"] for g in got])
    print(f"google StreamingRecognize WER {wer:.3f}, asr.v1 stream {ours_stream_wer:.3f}")
    assert abs(wer - ours_stream_wer) <= WER_MARGIN
    interims = [i for g in got for i in g["interims"]]
    assert interims, "no interim results at 4x real time"
    assert all(0.0 <= i["stability"] < 1.0 for i in interims)
    for g in got:
        ends = [f["end_s"] for f in g["finals"]]
        assert ends == sorted(ends) and all(f["stability"] == 1.0 for f in g["finals"])
        assert all(f["language"] == "en-US" for f in g["finals"])


def test_google_single_utterance_ends_with_the_event(real_server, tmp_path, clean):
    paths, _ = clean
    longest = max(paths, key=lambda p: p.stat().st_size)
    [got] = drive(real_server, tmp_path, "google", "stream", [longest], single_utterance=True)
    assert len(got["finals"]) == 1
    assert got["events"][-1] == 1  # END_OF_SINGLE_UTTERANCE, last


def test_google_bad_requests_raise_invalid_argument(real_server, tmp_path, clean):
    paths, _ = clean
    got = drive(real_server, tmp_path, "google", "bad", paths[:1])
    assert {g["case"]: g["error"] for g in got} == {
        "webm": "InvalidArgument",
        "french_on_english_model": "InvalidArgument",
        "gcs_uri": "InvalidArgument",
        "diarization": "InvalidArgument",
        "not_audio": "InvalidArgument",
    }
    messages = {g["case"]: g["message"] for g in got}
    assert "OGG_OPUS" in messages["webm"] and "content" in messages["gcs_uri"]


def test_riva_offline_recognize_matches_our_api(real_server, tmp_path, corpus, ours_unary_wer):
    paths, refs = corpus
    got = drive(real_server, tmp_path, "riva", "unary", paths, words=True)
    wer = word_error_rate(refs, [g["text"] for g in got])
    print(f"riva offline_recognize WER {wer:.3f}, asr.v1 {ours_unary_wer:.3f}")
    assert abs(wer - ours_unary_wer) <= WER_MARGIN
    first = got[0]
    assert first["language"] == [["en-US"]]
    words = first["words"]
    assert words and all(isinstance(w[1], int) and w[2] >= w[1] for w in words)  # milliseconds
    assert abs(first["audio_processed"][-1] * 1000 - words[-1][2]) < 1000


def test_riva_streaming_with_interim_results(real_server, tmp_path, clean, ours_stream_wer):
    paths, refs = clean
    got = drive(real_server, tmp_path, "riva", "stream", paths, pace=PACE)
    wer = word_error_rate(refs, [g["text"] for g in got])
    print(f"riva streaming WER {wer:.3f}, asr.v1 stream {ours_stream_wer:.3f}")
    # The WAV header Riva's file iterator sends first is skipped, not heard as audio.
    assert abs(wer - ours_stream_wer) <= WER_MARGIN
    assert any(g["interims"] for g in got), "no interim results at 4x real time"
    for g in got:
        processed = [f["audio_processed"] for f in g["finals"]]
        assert processed == sorted(processed)


def test_riva_bad_requests_and_config(real_server, tmp_path, clean):
    paths, _ = clean
    got = drive(real_server, tmp_path, "riva", "bad", paths[:1])
    assert {g["case"]: g["error"] for g in got} == {
        "no_rate_for_raw_pcm": "INVALID_ARGUMENT",
        "unknown_model": "INVALID_ARGUMENT",
        "french_on_english_model": "INVALID_ARGUMENT",
    }
    [config] = drive(real_server, tmp_path, "riva", "config", [])
    assert config["model_name"] == "tiny.en"
    assert config["language_code"] == "en-US"
