"""`python -m loadgen decode` end to end on the random-weight Whisper and two real
test-other files: both servers (eager and compiled) answer every file at each concurrency, the
report has a row per run, and in fp32 the compiled step gives the eager transcripts."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadgen.inprocess.decode_bench import main
from tests.conftest import LIBRISPEECH, require_data
from tests.random_whisper import make_random_checkpoint


def test_decode_bench_compares_eager_and_compiled(
    tiny_en_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_data()
    checkpoint = make_random_checkpoint(tiny_en_dir, tmp_path / "random")
    argv = ["--dataset", str(LIBRISPEECH / "test-other"), "--limit", "2", "--concurrency",
            "1,2", "--model", str(checkpoint), "--max-active", "2",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "eager vs compiled (inductor)" in out
    for row in ("| eager | 1 |", "| compiled | 1 |", "| eager | 2 |", "| compiled | 2 |"):
        assert row in out
    assert "transcripts that differ: 0 of 2" in out
    assert (tmp_path / "cache" / "inductor").is_dir()  # compiled artifacts kept there
