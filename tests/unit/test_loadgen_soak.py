"""`loadgen soak`: the RSS verdict (growth after the warm-up against the target) and a short
run against a server on loopback with the fake model, unary calls and a real-time stream."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from loadgen import soak
from server.config import Settings
from server.embedded import EmbeddedServer
from server.models.fake import FakeModel

SERIES = [(60.0, 100.0), (300.0, 110.0), (360.0, 112.0), (420.0, 113.3)]


def test_growth_counts_from_the_first_sample_after_the_warm_up() -> None:
    result = soak.verdict(SERIES, warmup_s=300, max_growth_pct=5, errors=0)
    assert (result.baseline_mib, result.last_mib) == (110.0, 113.3)
    assert result.growth_pct == pytest.approx(3.0)
    assert result.ok and result.line().startswith("verdict: PASS: RSS 110 -> 113 MiB")


def test_growth_above_the_target_or_any_error_fails() -> None:
    assert not soak.verdict(SERIES, warmup_s=300, max_growth_pct=2, errors=0).ok
    failed = soak.verdict(SERIES, warmup_s=300, max_growth_pct=5, errors=1)
    assert not failed.ok and "1 error(s)" in failed.line()
    # Counted from the start (warm-up 0), model loading would count as growth: 13 % here.
    assert not soak.verdict(SERIES, warmup_s=0, max_growth_pct=5, errors=0).ok


def test_a_run_shorter_than_the_warm_up_gives_no_memory_figure() -> None:
    result = soak.verdict(SERIES[:1], warmup_s=300, max_growth_pct=5, errors=0)
    assert math.isnan(result.growth_pct) and result.ok


def test_a_short_soak_prints_its_rss_series_and_verdict(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    token = tmp_path / "tokens.txt"  # a comment line first: the token is the next line
    token.write_text("# one token per line\nsecret\n")
    server = EmbeddedServer(Settings(max_batch_size=4, max_wait_ms=5), FakeModel()).start()
    try:
        argv = ["--target", server.address, "--pid", str(os.getpid()), "--minutes", "0.05",
                "--interval-s", "1", "--warmup-minutes", "0", "--max-growth-pct", "1000",
                "--unary", "1", "--streams", "1", "--dataset", "sample:test-clean",
                "--limit", "2", "--token-file", str(token)]  # fmt: skip
        assert soak.main(argv) == 0
    finally:
        server.stop()
    out = capsys.readouterr().out
    assert "rss series (s, MiB): 1:" in out
    assert "unary n=" in out and "errors 0" in out
    assert "verdict: PASS" in out
