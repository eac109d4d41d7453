"""Live streams and --find-capacity against real servers on loopback: tiny.en with real
LibriSpeech for the stream sweep, the fake model with a known per-window cost for the
capacity search, a master and a worker for a distributed stream level."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import soundfile as sf

from asr.v1 import asr_pb2, asr_pb2_grpc
from loadgen.wer import word_error_rate
from server.config import Settings
from server.embedded import EmbeddedServer
from server.models.fake import FakeModel
from tests.conftest import LIBRISPEECH, require_data
from tests.integration.test_loadgen_distributed import follow, start, wait_for_port
from tests.integration.test_loadgen_run import loadgen, read_csv


@pytest.fixture(scope="module")
def short_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four test-clean utterances of 3-11 s (each long enough for an interim before its
    end), in LibriSpeech's layout: a real-time sweep over them stays short."""
    require_data()
    picked = []
    for trans in sorted((LIBRISPEECH / "test-clean").rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            uid, _, text = line.partition(" ")
            audio = trans.parent / f"{uid}.flac"
            if audio.is_file() and 3.0 <= sf.info(audio).duration <= 11.0:
                picked.append((audio, text))
    picked = sorted(picked, key=lambda p: p[0].name)[:4]
    root = tmp_path_factory.mktemp("short") / "test-clean"
    for audio, text in picked:
        speaker, chapter, _ = audio.stem.split("-")
        folder = root / speaker / chapter
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(audio, folder / audio.name)
        with (folder / f"{speaker}-{chapter}.trans.txt").open("a") as f:
            f.write(f"{audio.stem} {text}\n")
    assert len(picked) == 4
    return root


def unary_wer(address: str, split: Path, ids: set[str]) -> float:
    """WER of plain Recognize calls on the same files."""
    refs, hyps = [], []
    with grpc.insecure_channel(address) as channel:
        stub = asr_pb2_grpc.SpeechStub(channel)
        for trans in split.rglob("*.trans.txt"):
            for line in trans.read_text().splitlines():
                uid, _, text = line.partition(" ")
                if uid in ids:
                    audio = asr_pb2.RecognitionAudio(
                        content=(trans.parent / f"{uid}.flac").read_bytes()
                    )
                    response = stub.Recognize(asr_pb2.RecognizeRequest(audio=audio), timeout=120)
                    refs.append(text)
                    hyps.append(" ".join(r.alternatives[0].transcript for r in response.results))
    return word_error_rate(refs, hyps)


def test_two_level_real_time_stream_sweep(real_server, short_split: Path, tmp_path: Path):
    out = tmp_path / "streams"
    result = loadgen(
        "run", "--target", real_server.address, "--mode", "stream", "--streams", "1,2",
        "--dataset", str(short_split), "--duration", "5", "--warmup", "0",
        "--label", "cpu", "--price-per-hour", "0.10", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    rows = read_csv(out / "summary.csv")
    assert [(r["mode"], r["streams"]) for r in rows] == [("stream", "1"), ("stream", "2")]
    for row in rows:
        assert int(row["utterances"]) >= 1 and int(row["errors"]) == 0, row
        assert row["errors_by_code"] == "" and row["measured"] == "true", row
        assert float(row["final_lag_p50_ms"]) <= float(row["final_lag_p99_ms"]), row
        assert float(row["final_lag_p99_ms"]) <= float(row["final_lag_max_ms"]), row
        assert float(row["first_interim_p50_ms"]) > 0 and float(row["interim_p50_ms"]) > 0, row
        # Goodput counts utterances whose final came back in the 5 s window: a long one may
        # not have, so the RTFx may be 0 at one stream; it is never missing.
        assert float(row["flicker_words"]) >= 0 and float(row["audio_s_per_s"]) >= 0, row
    records = [r for r in read_csv(out / "records.csv") if r["status"] == "OK"]
    assert records and {r["status"] for r in read_csv(out / "records.csv")} == {"OK"}
    for r in records:
        audio_ms = float(r["audio_s"]) * 1000
        # Real time: the final cannot come before the last chunk, sent (audio - 100 ms) after
        # the first; the first interim comes while the utterance is still being spoken.
        assert float(r["latency_ms"]) >= audio_ms - 100, r
        assert r["first_interim_ms"], f"no interim before the final: {r}"
        assert float(r["first_interim_ms"]) < audio_ms, r
        assert float(r["final_lag_ms"]) > 0 and r["stream"].startswith("local:"), r
    stream_wer = word_error_rate(
        [_reference(short_split, r["item_id"]) for r in records], [r["transcript"] for r in records]
    )
    assert (
        stream_wer
        <= unary_wer(real_server.address, short_split, {r["item_id"] for r in records}) + 0.05
    )
    meta = json.loads((out / "summary.json").read_text())
    assert meta["mode"] == "stream" and meta["settings"]["pace"] == 1.0
    assert meta["settings"]["chunk_ms"] == 100
    assert (out / "stream.png").read_bytes().startswith(b"\x89PNG")
    page = (out / "report.html").read_text()
    assert "$/1000 stream h" in page and "final lag p99 ms" in page
    assert "| stream | 2 |" in result.stdout and "final lag p50" in result.stderr


def _reference(split: Path, uid: str) -> str:
    speaker, chapter, _ = uid.split("-")
    for line in (
        (split / speaker / chapter / f"{speaker}-{chapter}.trans.txt").read_text().splitlines()
    ):
        if line.startswith(uid + " "):
            return line.partition(" ")[2]
    raise KeyError(uid)


@pytest.fixture
def costly_fake_server() -> Iterator[str]:
    """The fake model at 0.2 s per window, one window per model call: c requests in flight
    each wait for all c, so the closed-loop latency is about c x 200 ms."""
    model = FakeModel()
    model.delay_s = 0.2
    server = EmbeddedServer(Settings(max_batch_size=1, max_wait_ms=0, max_queue_size=512), model)
    yield server.start().address
    server.stop()


def test_find_capacity_finds_the_known_capacity_within_one_step(
    costly_fake_server: str, short_split: Path, tmp_path: Path
):
    """SLO p99 <= 900 ms: c=4 (about 800 ms) meets it, c=5 (about 1000 ms) does not."""
    out = tmp_path / "capacity"
    result = loadgen(
        "run", "--target", costly_fake_server, "--dataset", str(short_split),
        "--concurrency", "1", "--find-capacity", "--slo-p99-ms", "900",
        "--duration", "2", "--warmup", "0.5", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    capacity = json.loads((out / "summary.json").read_text())["capacity"]
    assert abs(capacity["capacity"] - 4) <= 1, capacity
    tried = [t["level"] for t in capacity["tried"]]
    assert tried[:3] == [1, 2, 4] and len(tried) == len(set(tried)), capacity
    rows = read_csv(out / "summary.csv")
    assert [float(r["concurrency"]) for r in rows] == tried  # every probe is a level
    assert (
        f"capacity: concurrency {capacity['capacity']:g} meets p99 latency <= 900 ms"
        in result.stdout
    )
    assert "<h2>Capacity</h2>" in (out / "report.html").read_text()


def test_a_stream_level_across_a_master_and_a_worker(short_split: Path, tmp_path: Path):
    model = FakeModel()
    server = EmbeddedServer(Settings(max_batch_size=4, max_wait_ms=5), model).start()
    out = tmp_path / "dist"
    dataset = ["--dataset", str(short_split), "--seed", "0"]
    master_args = [
        "run", "--master", "--expect-workers", "1", "--master-bind-host", "127.0.0.1",
        "--master-bind-port", "0", "--target", server.address, *dataset, "--mode", "stream",
        "--streams", "2", "--pace", "4", "--duration", "2", "--warmup", "0",
        "--worker-timeout", "120", "--out", str(out),
    ]  # fmt: skip
    master = start(master_args, subprocess.DEVNULL, subprocess.PIPE)
    worker = None
    try:
        assert master.stderr is not None
        lines, seen = follow(master.stderr)
        port = wait_for_port(lines, seen, timeout_s=120)
        log = (tmp_path / "worker.log").open("w")
        worker_args = ["run", "--worker", "--master-host", "127.0.0.1", "--master-port", str(port)]
        worker = start([*worker_args, *dataset], log, subprocess.STDOUT)
        assert master.wait(timeout=180) == 0, "".join(seen)[-4000:]
        assert worker.wait(timeout=60) == 0, (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        for proc in (master, worker):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        server.stop()
    (level,) = json.loads((out / "summary.json").read_text())["levels"]
    assert level["mode"] == "stream" and level["streams"] == 2 and level["errors"] == 0
    assert level["utterances"] >= 2 and level["requests_by_worker"].keys() == {"w0"}
    with (out / "records.csv").open() as f:
        records = [r for r in csv.DictReader(f) if r["phase"] == "measure"]
    assert {r["stream"].split(":")[0] for r in records} == {"w0"}
    assert all(r["interim_ms"] for r in records)  # the interims travelled with the records


def test_several_utterances_per_stream_each_get_their_final(short_split: Path, tmp_path: Path):
    """--utterances 2: two files with silence between them in one stream; the server's
    endpointer finalizes each, and each final is attributed to its own utterance."""
    server = EmbeddedServer(Settings(max_batch_size=4, max_wait_ms=5), FakeModel()).start()
    out = tmp_path / "two"
    try:
        result = loadgen(
            "run", "--target", server.address, "--dataset", str(short_split), "--mode", "stream",
            "--streams", "1", "--utterances", "2", "--pace", "4", "--duration", "3",
            "--warmup", "0", "--out", str(out),
        )  # fmt: skip
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr[-4000:]
    records = read_csv(out / "records.csv")
    by_stream: dict[str, list[dict[str, str]]] = {}
    for r in records:
        by_stream.setdefault(r["stream"], []).append(r)
    assert by_stream and all(len(rs) == 2 for rs in by_stream.values()), by_stream
    for first, second in by_stream.values():
        assert first["status"] == second["status"] == "OK"
        assert first["item_id"] != second["item_id"]
        assert first["transcript"].startswith("n=") and second["transcript"].startswith("n=")
        # The second utterance starts after the first and the gap (1.5 s of audio at pace 4).
        assert (
            float(second["sent_ts"]) - float(first["sent_ts"])
            >= (float(first["audio_s"]) + 1.5) / 4 - 0.1
        )
