"""--find-capacity's search, the stream summary it is checked on, stream rows in compare, and
the flags that go with them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loadgen.capacity import meets_slo, search, why_not
from loadgen.cli import build_parser, run_config
from loadgen.compare import load_run, write_compare
from loadgen.config import ConfigError
from loadgen.stats import NAN, Record, summarize


def probe_below(capacity: float, calls: list[float]):
    def probe(x: float) -> bool:
        calls.append(x)
        return x <= capacity

    return probe


@pytest.mark.parametrize("capacity", [1, 2, 5, 6, 13, 64, 100])
def test_integer_search_finds_the_exact_capacity_probing_each_level_once(capacity: int):
    calls: list[float] = []
    found = search(probe_below(capacity, calls), 1, integer=True, limit=1024)
    assert found.capacity == capacity and not found.limited
    assert len(calls) == len(set(calls)) == len(found.tried)
    assert calls[: int(math.log2(capacity)) + 2] == [
        2.0**k for k in range(int(math.log2(capacity)) + 2)
    ]  # grows x2 first
    assert len(calls) <= 2 * math.log2(capacity + 1) + 2


def test_search_from_a_failing_start_halves_down_then_bisects():
    calls: list[float] = []
    found = search(probe_below(3, calls), 16, integer=True, limit=1024)
    assert found.capacity == 3 and calls[:4] == [16, 8, 4, 2]


def test_search_reports_none_when_even_the_minimum_fails_and_the_bound_when_all_pass():
    assert search(lambda x: False, 4, integer=True, limit=64).capacity is None
    everything = search(lambda x: True, 1, integer=True, limit=40)
    assert everything.capacity == 40 and everything.limited


def test_rate_search_ends_within_the_resolution():
    found = search(lambda x: x <= 7.3, 1.0, integer=False, limit=100, resolution=0.05)
    assert found.capacity is not None and 7.3 / 1.05 <= found.capacity <= 7.3


def stream_record(i: int, lag_ms: float, *, stream: str = "local:1", behind: bool = False,
                  status: str = "OK") -> Record:  # fmt: skip
    return Record(
        item_id=f"u{i}", worker="local", sent_ts=1000.0 + i, latency_ms=5000.0 + lag_ms,
        status=status, audio_s=5.0, transcript="hello world", stream=stream,
        first_interim_ms=1100.0 + i, interim_ms=(100.0, 200.0 + i), final_lag_ms=lag_ms,
        flicker_words=i % 2, behind=behind,
    )  # fmt: skip


def test_stream_summary_takes_its_percentiles_from_the_final_lag():
    records = [stream_record(i, lag) for i, lag in enumerate([100, 200, 300, 400])]
    records.append(stream_record(9, NAN, stream="local:2", behind=True, status="UNAVAILABLE"))
    s = summarize(records, 10.0, level=0, mode="stream", streams=2)
    assert (s.streams, s.utterances, s.samples, s.errors) == (2, 5, 4, 1)
    assert s.final_lag_p50_ms == s.p50_ms == 250 and s.final_lag_max_ms == s.max_ms == 400
    assert s.final_lag_p99_ms == s.p99_ms and 390 < s.p99_ms < 400
    assert s.first_interim_p50_ms == pytest.approx(1101.5)
    assert s.interim_p50_ms == pytest.approx(150.0) and s.interim_p99_ms < 204
    assert s.flicker_words == 0.5 and s.behind_streams == 1 and s.no_interim == 0
    assert s.audio_s_per_s == 2.0  # four utterances of 5 s in 10 s
    assert not meets_slo(s, 1000) and "1 errors" in why_not(s, 1000)
    ok = summarize(records[:4], 10.0, level=0, mode="stream", streams=1)
    assert meets_slo(ok, 400) and not meets_slo(ok, 390)
    assert why_not(ok, 390) == "p99 397 ms > 390 ms"


def test_a_stream_behind_real_time_fails_the_slo_whatever_its_lag():
    s = summarize([stream_record(0, 10, behind=True)], 10.0, level=0, mode="stream", streams=1)
    assert s.errors == 0 and not meets_slo(s, 1000)
    assert why_not(s, 1000) == "1 streams behind real time"


def test_records_survive_the_trip_to_the_master_with_their_interims():
    record = stream_record(1, 250.0)
    row = [list(v) if isinstance(v, tuple) else v for v in record.to_row()]  # msgpack: lists
    assert Record.from_row(row) == record


def args(*flags: str):
    return build_parser().parse_args(
        ["run", "--target", "h:1", "--dataset", "d", "--out", "o", *flags]
    )


def test_stream_mode_reads_concurrency_as_streams_for_deployments_that_always_pass_it():
    config = run_config(args("--mode", "stream", "--concurrency", "1,2"))
    assert config.streams == (1, 2) and config.concurrency == ()
    assert [p.mode for p in config.levels()] == ["stream", "stream"]


def test_stream_flags_build_stream_plans():
    config = run_config(args("--mode", "stream", "--streams", "1,4", "--pace", "max",
                             "--chunk-ms", "200", "--utterances", "2"))  # fmt: skip
    plans = config.levels()
    assert [(p.mode, p.streams, p.users) for p in plans] == [("stream", 1, 1), ("stream", 4, 4)]
    assert math.isinf(plans[0].pace) and plans[0].chunk_ms == 200 and plans[1].utterances == 2
    assert plans[1].describe() == "streams=4" and plans[1].x == 4


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mode", "stream", "--streams", "1", "--concurrency", "2"], "--mode stream takes"),
        (["--mode", "stream", "--rate", "2"], "--mode stream takes its levels"),
        (["--streams", "2"], "--streams needs --mode stream"),
        (["--mode", "stream", "--streams", "0"], "--streams values must be >= 1"),
        (["--mode", "stream", "--streams", "1", "--pace", "0"], "--pace takes"),
        (["--mode", "stream", "--streams", "1", "--chunk-ms", "5"], "--chunk-ms must be"),
        (["--concurrency", "1,2", "--find-capacity", "--slo-p99-ms", "9"], "exactly one of"),
        (["--concurrency", "1", "--find-capacity"], "needs --slo-p99-ms"),
        (["--mode", "stream", "--streams", "1", "--find-capacity", "--slo-p99-ms", "9"],
         "needs --slo-final-p99-ms"),
        (["--concurrency", "1", "--slo-p99-ms", "9"], "go with --find-capacity"),
    ],
)  # fmt: skip
def test_stream_and_capacity_flags_are_validated(flags: list[str], message: str):
    with pytest.raises(ConfigError, match=message):
        run_config(args(*flags))


def write_stream_run(folder: Path, label: str, price: float, lags: dict[int, float]) -> Path:
    levels = [
        {"mode": "stream", "streams": n, "measured": True, "p99_ms": lag, "errors": 0,
         "dropped": 0, "behind_streams": 0, "samples": 20, "audio_s_per_s": n * 0.9,
         "rps": n / 10, "wer": 0.05, "p99_ci_ms": [lag - 10, lag + 10]}
        for n, lag in lags.items()
    ]  # fmt: skip
    folder.mkdir(parents=True)
    meta = {
        "label": label,
        "mode": "stream",
        "price_per_hour": price,
        "levels": levels,
        "server_info": {"model_id": "tiny.en", "dtype": "float32"},
        "dataset": {"fingerprint": "f"},
        "settings": {"pace": 1.0, "chunk_ms": 100},
    }
    (folder / "summary.json").write_text(json.dumps(meta))
    return folder


def test_compare_names_streams_per_host_and_the_cheapest_card_for_live(tmp_path: Path):
    a = write_stream_run(tmp_path / "a", "t4", 0.50, {1: 300, 4: 500, 8: 900, 16: 3000})
    b = write_stream_run(tmp_path / "b", "a100", 3.00, {1: 200, 8: 400, 16: 600, 32: 700})
    rows, text = write_compare(
        tmp_path / "cmp", [load_run(a), load_run(b)], None, slo_final_p99_ms=1000
    )
    held = {r.label: (r.slo_level, r.cost_1000_stream_h) for r in rows}
    assert held == {"t4": (8.0, 62.5), "a100": (32.0, 93.75)}
    assert "Cheapest for live streams (p99 final lag <= 1000 ms): t4, 8 streams per host" in text
    assert "$62.50 per 1,000 stream-hours" in text
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["cheapest_live_meeting_slo"]["label"] == "t4"
    tight = write_compare(tmp_path / "c2", [load_run(a), load_run(b)], None, slo_final_p99_ms=450)
    assert {r.label: r.slo_level for r in tight[0]} == {"t4": 1.0, "a100": 8.0}


def test_compare_checks_stream_runs_against_stream_runs_only(tmp_path: Path):
    a = write_stream_run(tmp_path / "a", "t4", 0.5, {1: 300})
    b = write_stream_run(tmp_path / "b", "a100", 3.0, {1: 200})
    meta = json.loads((b / "summary.json").read_text())
    meta["settings"]["pace"] = 2.0
    (b / "summary.json").write_text(json.dumps(meta))
    unary = tmp_path / "u"
    unary.mkdir()
    files = {"label": "t4-files", "mode": "unary", "levels": [], "settings": {"pace": None}}
    (unary / "summary.json").write_text(json.dumps(files))
    with pytest.raises(Exception, match=r"--pace differs: t4=1\.0, a100=2\.0"):
        write_compare(tmp_path / "x", [load_run(a), load_run(b)], None)
    rows, _ = write_compare(tmp_path / "y", [load_run(a), load_run(unary)], None)
    assert [r.label for r in rows] == ["t4"]  # the unary run has no levels: no row, no refusal
