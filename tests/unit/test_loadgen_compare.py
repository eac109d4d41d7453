"""`loadgen compare` on two prepared run folders (table values, SLO pick, cost figures), and the
run report writer on synthetic levels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from loadgen.cli import main
from loadgen.compare import (
    NotComparable,
    comparability,
    compare_runs,
    load_run,
    peak,
    slo_capacity,
    write_compare,
)
from loadgen.config import LevelPlan
from loadgen.costs import cost_per_1000h
from loadgen.report import write_run
from loadgen.stats import OK, LevelResult, Record, summarize


def level(c: int, audio_s_per_s: float, p99_ms: float, errors: int = 0, mode: str = "closed"):
    return {
        "mode": mode,
        "concurrency": c if mode == "closed" else None,
        "rate": None if mode == "closed" else float(c),
        "requests": 100,
        "errors": errors,
        "dropped": 0,
        "rps": audio_s_per_s / 10,
        "audio_s_per_s": audio_s_per_s,
        "p99_ms": p99_ms,
        "wer": 0.05,
    }


def make_run(root: Path, name: str, label: str, device: str, price: float | None, levels) -> Path:
    path = root / name
    path.mkdir()
    summary = {
        "label": label,
        "price_per_hour": price,
        "server_info": {"model_id": "tiny.en", "device_name": device},
        "levels": levels,
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    a = make_run(
        tmp_path,
        "run-a",
        "g5.xlarge",
        "NVIDIA A10G",
        1.006,
        [level(1, 20, 300), level(4, 60, 600), level(8, 80, 1200), level(16, 85, 2500)],
    )
    b = make_run(
        tmp_path,
        "run-b",
        "",  # no --label: named by its GPU
        "NVIDIA H100 80GB HBM3",
        4.0,
        [
            level(1, 30, 200),
            level(4, 100, 400),
            level(8, 180, 700),
            level(16, 250, 1500),
            level(32, 240, 3000, errors=2),
            level(2, 50, 900, mode="open"),
        ],
    )
    return [a, b]


def test_table_values_slo_pick_and_costs(runs: list[Path]):
    rows = compare_runs([load_run(p) for p in runs], slo_p99_ms=1000)
    a, b_closed, b_open = rows
    assert (a.label, a.mode, b_closed.label, b_open.mode) == (
        "g5.xlarge",
        "closed",
        "NVIDIA H100 80GB HBM3",
        "open",
    )
    assert (a.peak_level, a.peak_audio_s_per_s, a.slo_level, a.slo_audio_s_per_s) == (16, 85, 4, 60)
    assert (b_closed.peak_level, b_closed.slo_level, b_closed.slo_p99_ms) == (16, 8, 700)
    assert (b_open.slo_level, b_open.slo_rps) == (2.0, 5.0)
    # $ per 1,000 audio hours = price per hour x 1000 / RTFx.
    assert a.cost_1000h_peak == pytest.approx(1.006 * 1000 / 85)
    assert a.cost_1000h_slo == pytest.approx(1.006 * 1000 / 60)
    assert b_closed.cost_1000h_peak == pytest.approx(16.0)
    assert b_closed.cost_1000h_slo == pytest.approx(4000 / 180)


def test_slo_capacity_skips_levels_with_errors_and_none_meet():
    levels = [level(1, 10, 100), level(2, 20, 150, errors=1), level(4, 30, 2000)]
    assert slo_capacity(levels, 500)["concurrency"] == 1
    assert slo_capacity(levels, 50) is None


def test_slo_capacity_stops_at_the_first_failing_level():
    """c=2 fails the SLO; c=4 passes again (noise) with a better RTFx: capacity is still c=1,
    with c=1's throughput (the bug: c=4 and its RTFx)."""
    levels = [level(4, 90, 800), level(1, 20, 300), level(2, 40, 1200)]  # any order
    capacity = slo_capacity(levels, 1000)
    assert (capacity["concurrency"], capacity["audio_s_per_s"]) == (1, 20)
    # Of the levels before the first failure, the best throughput achieved (c=4 fell back).
    dip = [level(1, 20, 300), level(2, 40, 500), level(4, 35, 700), level(8, 90, 1500)]
    assert slo_capacity(dip, 1000)["concurrency"] == 2
    not_measured = {**level(2, 0, 0), "measured": False, "p99_ms": None}
    assert (
        slo_capacity([level(1, 20, 300), not_measured, level(4, 90, 800)], 1000)["concurrency"] == 1
    )


def test_saturated_and_unmeasured_levels_are_never_the_peak():
    saturated = {**level(8, 300, 900, mode="open"), "saturated": True}
    unmeasured = {**level(4, 0, 0, mode="open"), "measured": False, "audio_s_per_s": None}
    top = peak([level(1, 50, 400, mode="open"), saturated, unmeasured])
    assert top is not None and top["rate"] == 1.0
    assert slo_capacity([level(1, 50, 400, mode="open"), saturated], 1000)["rate"] == 1.0


def test_compare_refuses_runs_that_differ_and_force_warns(runs: list[Path], tmp_path: Path, caplog):
    a, b = (json.loads((p / "summary.json").read_text()) for p in runs)
    a["server_info"]["dtype"], b["server_info"]["dtype"] = "float32", "bfloat16"
    a["dataset"], b["dataset"] = {"fingerprint": "f00"}, {"fingerprint": "ba4"}
    a["settings"], b["settings"] = {"duration_s": 30.0}, {"duration_s": 6.0}
    for path, data in zip(runs, (a, b), strict=True):
        (path / "summary.json").write_text(json.dumps(data))
    loaded = [load_run(p) for p in runs]
    assert len(comparability(loaded)) == 3
    with pytest.raises(NotComparable, match=r"dtype differs: g5\.xlarge=float32"):
        write_compare(tmp_path / "no", loaded, 1000)
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "cli")]) == 2
    assert "pass --force to compare anyway" in caplog.text
    assert not (tmp_path / "no").exists()
    _, text = write_compare(tmp_path / "yes", loaded, 1000, force=True)
    assert text.startswith("WARNING: compared with --force") and "--duration differs" in text
    assert "data set (fingerprint) differs" in (tmp_path / "yes" / "report.html").read_text()
    assert cost_per_1000h(None, 50.0) is None
    assert cost_per_1000h(2.0, 0.0) is None


def test_write_compare_names_the_cheapest_card_meeting_the_slo(runs: list[Path], tmp_path: Path):
    out = tmp_path / "cmp"
    _, text = write_compare(out, [load_run(p) for p in runs], 1000)
    assert "Cheapest meeting p99 <= 1000 ms (closed loop): g5.xlarge, $16.77" in text
    for name in ("compare.csv", "compare.json", "compare.md", "report.html"):
        assert (out / name).is_file()
    for name in ("compare_latency.png", "compare_throughput.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    data = json.loads((out / "compare.json").read_text())
    assert data["cheapest_meeting_slo"]["label"] == "g5.xlarge"
    with (out / "compare.csv").open() as f:
        assert [r["label"] for r in csv.DictReader(f)] == [
            "g5.xlarge",
            "NVIDIA H100 80GB HBM3",
            "NVIDIA H100 80GB HBM3",
        ]
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_compare_cli_prints_the_table(runs: list[Path], tmp_path: Path, capsys):
    argv = ["compare", *map(str, runs), "--out", str(tmp_path / "c"), "--slo-p99-ms", "500"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| g5.xlarge | generate |" in out
    # At 500 ms: the A10G holds c=1 (20x real time, $50.30/1000 h), the H100 c=4 (100x, $40).
    assert "Cheapest meeting p99 <= 500 ms (closed loop): NVIDIA H100 80GB HBM3, $40.00" in out
    assert main(["compare", str(tmp_path / "nope"), "--out", str(tmp_path / "c2")]) == 2


def test_compare_keeps_runs_with_the_same_label_apart(runs: list[Path], tmp_path: Path):
    twin = make_run(tmp_path, "run-a2", "g5.xlarge", "NVIDIA A10G", 1.0, [level(1, 10, 100)])
    labels = [r.label for r in compare_runs([load_run(runs[0]), load_run(twin)], None)]
    assert labels == ["g5.xlarge (run-a)", "g5.xlarge (run-a2)"]


def test_run_report_files(tmp_path: Path):
    results = []
    for index, c in enumerate((1, 4)):
        plan = LevelPlan(index, "closed", c, concurrency=c)
        records = [
            Record(f"u{i}", "local", 100.0 + i, 50.0 * c + i, OK, 5.0, "hi", 1.0, 40.0, 45.0, c, 1)
            for i in range(10)
        ]
        summary = summarize(records[1:9], 8.0, level=index, mode="closed", concurrency=c)
        results.append(LevelResult(plan, summary, records, 99.0, 101.0, 101.0, 109.0))
    meta = {"label": "unit", "server_info": {"model_id": "tiny.en"}, "dataset": {"files": 10}}
    paths = write_run(tmp_path, meta, results)
    with (tmp_path / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["concurrency"] for r in rows] == ["1", "4"]
    assert {
        "requests",
        "errors",
        "rps",
        "audio_s_per_s",
        "p50_ms",
        "p90_ms",
        "p95_ms",
        "p99_ms",
    } <= set(rows[0])
    assert {"max_ms", "wer", "queue_p50_ms", "infer_p50_ms", "batch_size_mean"} <= set(rows[0])
    with (tmp_path / "records.csv").open() as f:
        phases = [r["phase"] for r in csv.DictReader(f)]
    assert phases[:3] == ["warmup", "measure", "measure"] and phases[9] == "cooldown"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["label"] == "unit" and len(summary["levels"]) == 2
    assert paths["latency.png"].read_bytes().startswith(b"\x89PNG")
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "<table>" in html


def test_prices_given_to_compare_override_the_runs(runs: list[Path], tmp_path: Path, capsys):
    argv = ["compare", *map(str, runs), "--out", str(tmp_path / "p"), "--slo-p99-ms", "1000"]
    assert main([*argv, "--price", "NVIDIA H100 80GB HBM3=1.0"]) == 0
    # H100 at $1/h: 1000/180 = $5.56 per 1000 h at its SLO point, cheaper than the A10G's $16.77.
    assert "Cheapest meeting p99 <= 1000 ms (closed loop): NVIDIA H100 80GB HBM3, $5.56" in (
        capsys.readouterr().out
    )
    assert main([*argv, "--price", "no-equals-sign"]) == 2
