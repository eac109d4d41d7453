"""The bounded fuzz pass of `make test`: each atheris target for a few thousand inputs from a
seed corpus of real files (in a subprocess: libFuzzer exits the process it runs in), and every
earlier find (tests/fuzz/regressions) replayed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asr.v1 import asr_pb2
from tests.conftest import ROOT, tone, wav_bytes

REGRESSIONS = ROOT / "tests" / "fuzz" / "regressions"
RUNS = 2000


def seed_corpus(folder: Path, target: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if target == "audio":
        short = tone(440, 0.1, 16_000)
        seeds = {
            "a.wav": wav_bytes(short, 16_000),
            "b.flac": wav_bytes(short, 8_000, "PCM_16", "FLAC"),
            "c.ogg": wav_bytes(short, 16_000, "VORBIS", "OGG"),
            "d.wav": wav_bytes(np.stack([short, short], axis=1), 16_000, "FLOAT"),
        }
        for name, content in seeds.items():
            (folder / name).write_bytes(b"\x00\x00\x00" + content)  # format bytes first
    else:
        config = asr_pb2.RecognitionConfig(
            language_code="en-US", initial_prompt="a prompt", beam_size=2, sample_rate_hertz=8000
        )
        request = asr_pb2.RecognizeRequest(config=config)
        (folder / "config").write_bytes(request.SerializeToString())


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize("target", ["audio", "request"])
def test_bounded_fuzz_pass(target, tmp_path):
    corpus = tmp_path / "corpus"
    seed_corpus(corpus, target)
    run = subprocess.run(
        # -rss_limit_mb=0: Linux carries a process's peak RSS across exec, so a child of a
        # pytest that has loaded real models "starts" over libFuzzer's 2 GB limit; the
        # per-allocation limit still catches an input that makes the code allocate too much.
        [sys.executable, "-m", "tests.fuzz.targets", target, f"-runs={RUNS}",
         "-max_len=8192", "-timeout=20", "-rss_limit_mb=0", "-malloc_limit_mb=2048",
         "-seed=1",  # the same inputs every run: make test must not find new bugs at random
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    finds = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash", "timeout")))
    assert run.returncode == 0 and not finds, (finds, run.stderr[-3000:])


@pytest.mark.parametrize(
    "path",
    sorted(p for p in REGRESSIONS.rglob("*") if p.is_file() and p.name != ".keep"),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_earlier_finds_stay_fixed(path):
    from tests.fuzz.targets import TARGETS

    TARGETS[path.parent.name](path.read_bytes())
