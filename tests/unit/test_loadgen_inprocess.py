"""Every in-process measuring command end to end on the random-weight Whisper (tests/
random_whisper.py) and the shipped sample: they run, and write what they promise. Figures are
meaningless here; the paths (in-process generate, each engine through gRPC, streams, study
compare) are what is checked. `engines` crashed after its first level when the generate engine
had no counters (stats() is None): test_engines_runs_both_engines_at_two_levels covers it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from loadgen.inprocess import engines, precision, study
from tests.random_whisper import make_random_checkpoint


@pytest.fixture(scope="module")
def random_model(tiny_en_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_random_checkpoint(tiny_en_dir, tmp_path_factory.mktemp("random")))


def test_study_writes_csv_json_plot_and_compare_prices_hosts(
    random_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "study"
    argv = ["--dataset", "sample:test-clean", "--models", random_model, "--dtypes", "float32",
            "--batch-sizes", "2,1", "--files", "3", "--device", "cpu", "--label", "this-cpu",
            "--price-per-hour", "0.10", "--threads", "1", "--max-new-tokens", "8",
            "--out", str(out)]  # fmt: skip
    assert study.main(argv) == 0
    with (out / "study.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["dtype"], r["path"], r["batch_size"]) for r in rows] == [
        ("float32", "generate", "1"), ("float32", "generate", "2"),
        ("float32", "server", "1"), ("float32", "server", "2"),
    ]  # fmt: skip
    for r in rows:
        assert r["files"] == "3" and float(r["s_per_file"]) > 0 and float(r["audio_s_per_s"]) > 0
        assert float(r["p50_ms"]) <= float(r["p99_ms"])
        assert float(r["wer"]) >= 0  # the sample has references
    assert [r["mean_server_batch"] for r in rows[:2]] == ["1.0", "1.667"]  # 3 files: 2 + 1
    assert (out / "study.png").read_bytes().startswith(b"\x89PNG")
    facts = json.loads((out / "study.json").read_text())
    assert (facts["device"], facts["dtype"], facts["label"]) == ("cpu", "float32", "this-cpu")
    assert facts["dtype_reason"] and facts["versions"]["torch"]
    assert "| float32 | generate | 2 | 3 |" in capsys.readouterr().out

    other = tmp_path / "other"  # a second "host": the same figures at twice the price
    other.mkdir()
    (other / "study.json").write_text(json.dumps({**facts, "label": "pricier"}))
    seed = tmp_path / "seed"  # a third, labelled as a seed card: priced from SEED_PRICES
    seed.mkdir()
    (seed / "study.json").write_text(
        json.dumps({**facts, "label": "g4dn.xlarge", "price_per_hour": None})
    )
    cmp = tmp_path / "cmp"
    argv = ["compare", str(out), str(other), str(seed), "--price", "pricier=0.20",
            "--out", str(cmp)]  # fmt: skip
    assert study.main(argv) == 0
    saved = json.loads((cmp / "study_compare.json").read_text())
    one, two, card = saved["rows"]
    assert two["cost_1000h_batch_1"] == pytest.approx(2 * one["cost_1000h_batch_1"])
    assert card["price_per_hour"] == 0.526
    assert one["cost_1000h_best"] <= one["cost_1000h_batch_1"]
    assert "cheapest is this-cpu (float32)" in saved["cheapest"][0]
    assert (cmp / "study_compare.csv").is_file() and (cmp / "study_compare.md").is_file()


def test_study_refuses_empty_lists(capsys: pytest.CaptureFixture[str]) -> None:
    assert study.main(["--models", "", "--out", "unused"]) == 2
    assert "study needs --models" in capsys.readouterr().err


def test_engines_runs_both_engines_at_two_levels(
    random_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--dataset", "sample:test-clean", "--files", "3", "--model", random_model,
            "--concurrency", "1,2", "--max-batch-size", "2", "--block", "2",
            "--threads", "1", "--max-new-tokens", "8"]  # fmt: skip
    assert engines.main(argv) == 0
    out = capsys.readouterr().out
    for name in ("in-process generate, batch 1", "generate engine, concurrency 1",
                 "continuous engine, concurrency 2", "in-process generate, batch 2"):  # fmt: skip
        assert f"| {name} | 3 |" in out
    assert "mean decode batch" in out  # the continuous engine's counters
    assert "WER vs references" in out and "targets:" in out


def test_precision_compares_dtypes_unary_and_streams(
    random_model: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--dataset", "sample:test-clean", "--files", "2", "--model", random_model,
            "--concurrency", "2", "--max-batch-size", "2", "--streams", "1",
            "--clips-per-stream", "1", "--stream-min-s", "0", "--stream-max-s", "3",
            "--max-new-tokens", "8"]  # fmt: skip
    assert precision.main(argv) == 0
    out = capsys.readouterr().out
    assert "--dtype auto here:" in out
    assert "| continuous engine, concurrency 2, float32 | 2 |" in out
    assert "| continuous engine, concurrency 2, bfloat16 | 2 |" in out
    assert "real-time streams, bfloat16:" in out and "| 1 stream(s), real time |" in out


def test_languages_reports_server_and_generate_per_clip(
    random_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Recordings named by language, the language left to the model, through the server and
    generate; an English-only model answers "en" for French speech (nothing to detect)."""
    from loadgen.inprocess import languages

    clips = tmp_path / "clips"
    clips.mkdir()
    jfk = Path(__file__).resolve().parents[2] / "samples" / "jfk.wav"
    for name in ("fr-1.wav", "de_2.wav"):
        (clips / name).write_bytes(jfk.read_bytes())
    out = tmp_path / "out"
    argv = ["--model", random_model, "--voices", "", "--clips", str(clips), "--device", "cpu",
            "--threads", "1", "--max-new-tokens", "8", "--out", str(out)]  # fmt: skip
    assert languages.main(argv) == 0
    with (out / "languages.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["clip"], r["spoken"], r["server"], r["generate"]) for r in rows] == [
        ("de_2.wav", "de", "en", "en"), ("fr-1.wav", "fr", "en", "en"),
    ]  # fmt: skip
    assert float(rows[0]["audio_s"]) == pytest.approx(11.0, abs=0.1)
    assert "agreed with generate on 2 of 2 (transcripts equal on 2)" in capsys.readouterr().out
    assert languages.main(["--voices", "xx", "--out", str(out)]) == 2
    assert languages.main(["--voices", "", "--out", str(out)]) == 2
