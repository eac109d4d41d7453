"""The GPU check's own machinery, without a GPU: results are on disk after every row, a part
that raises is recorded and the rest goes on, a test run cut off at its limit keeps the tests
that finished and counts as a failure, and the per-card --max-active settings in deploy/ fit
the slot caches the continuous engine allocates."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from loadgen.gpu import gputests, sizing, sweep
from loadgen.gpu.results import Results
from loadgen.gpu.run import Check


def test_every_row_is_on_disk_as_soon_as_it_is_added(tmp_path: Path) -> None:
    results = Results(tmp_path / "out" / "gpu_check.json")
    results.add_row("sweep", {"concurrency": 1})
    on_disk = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert on_disk["sweep"]["rows"] == [{"concurrency": 1}] and on_disk["status"] == "running"
    results.fail("something")
    assert results.finish() == 1
    assert json.loads(results.path.read_text())["status"] == "failed"


def test_a_part_that_raises_is_recorded_and_the_next_one_runs(tmp_path: Path) -> None:
    args = argparse.Namespace(budget_s=100.0, level_s=10.0)
    check = Check(args, Results(tmp_path / "r.json"), site=None)

    def boom() -> None:
        raise RuntimeError("CUDA out of memory at 64")

    check.part("first", 0, boom)
    assert check.part("second", 0, lambda: 42) == 42
    check.part("third", 1e9, lambda: 1)  # needs more time than is left
    doc = json.loads((tmp_path / "r.json").read_text())
    assert "CUDA out of memory" in doc["first"]["error"] and "boom" in doc["first"]["traceback"]
    assert doc["failures"] == ["first: RuntimeError: CUDA out of memory at 64"]
    assert "out of time" in doc["third"]["skipped"]


LINES = [
    (3.0, "tests/gpu/test_gpu.py::test_engines_agree[float16] PASSED [ 12%]"),
    (9.5, "tests/gpu/test_gpu.py::test_drafts_and_joins[float16] FAILED [ 25%]"),
]


def test_a_test_run_cut_off_keeps_what_finished_and_fails() -> None:
    report = gputests.parse(LINES)
    assert [c["outcome"] for c in report["cases"]] == ["passed", "failed"]
    assert report["cases"][1]["s"] == 6.5 and report["summary"] is None
    report.update(timed_out=True, limit_s=60, exit_code=-9)
    assert "ran past 60 s (2 finished)" in str(gputests.failure(report))
    report.update(timed_out=False)
    assert "no summary" in str(gputests.failure(report))


def test_a_test_run_killed_at_its_limit_reports_what_finished(tmp_path: Path) -> None:
    fake = tmp_path / "fake_pytest.py"
    fake.write_text(
        "import sys, time\n"
        + "".join(f"print({line!r}, flush=True)\n" for _, line in LINES)
        + "time.sleep(120)\n"  # a test that hangs: the limit must end it
    )
    seen: list[int] = []
    report = gputests.run_tests(
        tmp_path, tmp_path, "cpu", timeout_s=3.0,
        progress=lambda so_far: seen.append(len(so_far["cases"])),
        command=[sys.executable, str(fake)],
    )  # fmt: skip
    assert report["timed_out"] and [c["outcome"] for c in report["cases"]] == ["passed", "failed"]
    assert seen == [1, 2]
    assert "ran past 3 s (2 finished)" in str(gputests.failure(report))


def test_a_finished_test_run_passes_only_without_failures() -> None:
    done = [*LINES[:1], (10.0, "========== 1 passed in 10.00s ==========")]
    report = {**gputests.parse(done), "timed_out": False, "exit_code": 0}
    assert gputests.failure(report) is None
    failed = {**gputests.parse([*LINES, (12.0, "===== 1 failed, 1 passed in 12s =====")]),
              "timed_out": False, "exit_code": 1}  # fmt: skip
    assert "1 failed" in str(gputests.failure(failed))


def test_configurations_are_every_combination_and_interleaved(monkeypatch) -> None:
    monkeypatch.setattr(sweep, "server_flags", lambda: "--engine ... --compile {auto,on,off}")
    configs, note = sweep.configurations(["continuous", "generate"], ["float16"], ["off", "on"])
    assert [c.name for c in configs] == [
        "continuous float16, compile off", "continuous float16, compile on",
        "generate float16, compile off", "generate float16, compile on",
    ]  # fmt: skip
    assert note is None
    assert sweep.rotate(configs, 1)[0] is configs[1] and sweep.rotate(configs, 4) == configs
    monkeypatch.setattr(sweep, "server_flags", lambda: "--engine ...")
    configs, note = sweep.configurations(["continuous"], ["bfloat16"], ["off", "on"])
    assert [c.compile for c in configs] == [None] and "no --compile" in str(note)


def test_levels_shrink_to_fit_the_time_left_but_not_below_a_floor() -> None:
    assert sweep.level_seconds(10, 1000, 16) == 10
    assert sweep.level_seconds(10, 160, 16) == 8  # 16 levels of 8 s + 2 s each
    assert sweep.level_seconds(10, 20, 16) == 4
    assert sweep.level_seconds(3, 20, 16) == 3  # the floor never lengthens a level asked for


def test_large_v3_slot_caches_at_64_active_take_19_gib_in_fp16() -> None:
    per_slot = sizing.slot_bytes(sizing.CONFIGS["large-v3"], "float16")
    assert per_slot * 64 / 2**30 == pytest.approx(19.0, abs=0.1)
    # turbo has 4 decoder layers, not 32: an eighth of the cache
    assert sizing.slot_bytes(sizing.CONFIGS["large-v3-turbo"], "float16") * 8 == per_slot


def test_recommended_max_active_leaves_room_for_weights_and_headroom() -> None:
    for card, gib in sizing.CARDS_GIB.items():
        n = sizing.recommended_max_active("large-v3", gib, "float16")
        config = sizing.CONFIGS["large-v3"]
        used = n * sizing.slot_bytes(config, "float16") + sizing.weights_bytes(config, "float16")
        assert used <= gib * 2**30 * 0.85, card
    assert sizing.recommended_max_active("large-v3", sizing.CARDS_GIB["t4"]) < 64
    assert 64 < sizing.recommended_max_active("large-v3", sizing.CARDS_GIB["h100"]) < 384


def test_the_deployed_max_active_of_every_card_fits_its_models_caches() -> None:
    rows = sizing.check_deployed()
    assert {r["card"] for r in rows} >= {"t4", "l4", "a10g", "a100", "h100"}
    for row in rows:
        assert row["ok"], row
        config = sizing.CONFIGS[row["model"]]
        caches = row["max_active"] * sizing.slot_bytes(config, row["dtype"])
        assert caches < sizing.usable_bytes(sizing.CARDS_GIB[row["card"]]), row
