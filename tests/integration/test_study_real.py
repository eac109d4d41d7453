"""The seed study on tiny.en at batch sizes 1 and 2 on a few real files, then `study compare`
of two hosts made from it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from loadgen.inprocess.study import main
from tests.conftest import LIBRISPEECH, require_data


def test_study_writes_its_csv_json_and_plot_and_compare_prices_hosts(
    model_cache: Path, tmp_path: Path, capsys
):
    require_data()
    out = tmp_path / "study"
    argv = [
        "--dataset", str(LIBRISPEECH / "test-clean"), "--models", "tiny.en",
        "--batch-sizes", "2,1", "--files", "2", "--max-s", "4", "--cache-dir", str(model_cache),
        "--dtypes", "float32", "--label", "this-cpu", "--price-per-hour", "0.10",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    with (out / "study.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["path"], r["batch_size"]) for r in rows] == [
        ("tiny.en", "generate", "1"),
        ("tiny.en", "generate", "2"),
        ("tiny.en", "server", "1"),
        ("tiny.en", "server", "2"),
    ]
    for r in rows:
        assert r["files"] == "2" and float(r["s_per_file"]) > 0 and float(r["audio_s_per_s"]) > 0
        assert float(r["p50_ms"]) <= float(r["p99_ms"])
    assert [r["mean_server_batch"] for r in rows[:2]] == ["1.0", "2.0"]
    assert (out / "study.png").read_bytes().startswith(b"\x89PNG")
    facts = json.loads((out / "study.json").read_text())
    assert (facts["device"], facts["dtype"], facts["label"]) == ("cpu", "float32", "this-cpu")
    assert facts["versions"]["torch"] and facts["versions"]["transformers"]
    assert "| tiny.en | float32 | generate | 2 |" in capsys.readouterr().out
    assert all(float(r["wer"]) < 0.25 for r in rows)  # real weights: real transcripts

    other = tmp_path / "other"  # a second "host": the same figures, twice the price
    other.mkdir()
    (other / "study.json").write_text(json.dumps({**facts, "label": "pricier"}))
    cmp = tmp_path / "cmp"
    assert (
        main(["compare", str(out), str(other), "--price", "pricier=0.20", "--out", str(cmp)]) == 0
    )
    saved = json.loads((cmp / "study_compare.json").read_text())
    one, two = saved["rows"]
    assert two["cost_1000h_batch_1"] == 2 * one["cost_1000h_batch_1"]
    assert one["best_batch"] in (1, 2)
    assert one["cost_1000h_best"] <= one["cost_1000h_batch_1"]
    assert "tiny.en, online (batch 1): cheapest is this-cpu" in saved["cheapest"][0]
    assert (cmp / "study_compare.csv").is_file() and (cmp / "study_compare.md").is_file()
