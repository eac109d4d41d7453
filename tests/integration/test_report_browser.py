"""report.html in a real browser: headless Chromium renders it at 1280 px without errors, the
levels table fits the width, and the metadata header comes first. Skipped without Chromium
(`apt-get install chromium`)."""

from __future__ import annotations

import json
import random
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from loadgen.config import LevelPlan
from loadgen.report import write_run
from loadgen.stats import OK, LevelResult, Record, completed_in, in_window, summarize

WIDTH = 1280
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip(f"no headless browser ({', '.join(BROWSERS)}): apt-get install chromium")


def level(index: int, mode: str, x: float, rng: random.Random) -> LevelResult:
    """A level of a busy GPU: latency grows with load, every request with a server split."""
    concurrency = int(x) if mode == "closed" else None
    plan = LevelPlan(
        index, mode, concurrency or 1, concurrency=concurrency, rate=None if mode == "closed" else x
    )
    begin, t0, t1 = 1000.0, 1005.0, 1065.0
    records = []
    for i in range(400):
        latency = rng.lognormvariate(5.5, 0.3) * (1 + x / 16)
        split = {
            "prepare_ms": 4.0,
            "wait_ms": latency * 0.2,
            "encode_ms": latency * 0.15,
            "decode_ms": latency * 0.45,
            "held_ms": latency * 0.15,
        }
        records.append(
            Record(
                f"u{i}",
                "local",
                begin + i * 0.16,
                latency,
                OK,
                7.5,
                "text",
                split["wait_ms"],
                latency * 0.75,
                latency * 0.95,
                4,
                1,
                **split,
            )
        )
    summary = summarize(
        in_window(records, t0, t1),
        t1 - t0,
        level=index,
        mode=mode,
        concurrency=concurrency,
        rate=plan.rate,
        completions=completed_in(records, t0, t1),
    )
    return LevelResult(plan, summary, records, begin, t0, t0, t1)


def stream_level(index: int, streams: int, rng: random.Random) -> LevelResult:
    """A live-stream level: final lag, interims and a stream that fell behind at the top."""
    plan = LevelPlan(index, "stream", streams, streams=streams)
    begin, t0, t1 = 1000.0, 1005.0, 1065.0
    records = []
    for i in range(300):
        lag = rng.lognormvariate(6.0, 0.3) * (1 + streams / 32)
        records.append(
            Record(
                f"u{i}",
                "w0",
                begin + i * 0.2,
                8000.0 + lag,
                OK,
                8.0,
                "text",
                server_ms=lag * 0.8,
                wait_ms=lag * 0.1,
                encode_ms=lag * 0.3,
                decode_ms=lag * 0.3,
                held_ms=lag * 0.1,
                prepare_ms=2.0,
                stream=f"w0:{i % streams}",
                first_interim_ms=1200.0 + lag,
                interim_ms=(lag * 0.5, lag * 0.7),
                final_lag_ms=lag,
                flicker_words=i % 3,
                behind=streams >= 64 and i % streams == 0,
            )
        )
    summary = summarize(
        in_window(records, t0, t1), t1 - t0, level=index, mode="stream", streams=streams,
        completions=completed_in(records, t0, t1),
    )  # fmt: skip
    return LevelResult(plan, summary, records, begin, t0, t0, t1)


@pytest.fixture(scope="module", params=["unary", "stream"])
def report(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    rng = random.Random(0)
    if request.param == "stream":
        results = [stream_level(i, n, rng) for i, n in enumerate((1, 2, 4, 8, 16, 32, 64))]
    else:
        levels = [("closed", c) for c in (1, 2, 4, 8, 16, 32, 64)]
        levels += [("open", r) for r in (5, 10, 20)]
        results = [level(i, mode, x, rng) for i, (mode, x) in enumerate(levels)]
    meta = {
        "label": "h100-large-v3-bf16",
        "target": "server:50051",
        "mode": request.param,
        "price_per_hour": 4.1,
        "started_at": "2026-12-01T10:00:00+00:00",
        "loadgen_version": "0.1.0",
        "server_info": {
            "model_id": "openai/whisper-large-v3",
            "device": "cuda:0",
            "device_name": "NVIDIA H100 80GB HBM3",
            "dtype": "bfloat16",
            "engine": "continuous",
            "max_active": 384,
            "max_batch_size": 96,
            "max_wait_ms": 10,
            "max_queue_size": 768,
            "server_version": "0.1.0",
            "torch_version": "2.13.0",
        },
        "dataset": {
            "spec": "librispeech:test-clean",
            "files": 2620,
            "audio_s": 19452.5,
            "fingerprint": "3f2a9c0d1e4b5a67",
        },
        "settings": {
            "duration_s": 60.0,
            "warmup_s": 5.0,
            "timeout_s": 120.0,
            "seed": 0,
            "limit": None,
            "stability": False,
            "pace": 1.0,
            "chunk_ms": 100,
            "utterances": 1,
            "gap_ms": 1500,
            "behind_ms": 500,
        },
    }
    out = tmp_path_factory.mktemp("browser")
    write_run(out, meta, results)
    return out / "report.html"


MEASURE = """<script>
window.addEventListener('load', () => {
  const levels = document.querySelectorAll('table')[1];
  document.title = JSON.stringify({
    page: document.documentElement.scrollWidth,
    viewport: window.innerWidth,
    table: Math.ceil(levels.getBoundingClientRect().right),
    first: document.body.firstElementChild.tagName + ' '
      + document.querySelector('table').className,
    images: [...document.images].map(i => i.complete && i.naturalWidth > 0),
  });
});
</script>"""


def run_browser(*args: str) -> subprocess.CompletedProcess[str]:
    command = [
        browser(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={WIDTH},1800",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


def test_report_renders_at_1280_px_and_the_table_fits(report: Path, tmp_path: Path):
    shot = tmp_path / "report.png"
    done = run_browser(f"--screenshot={shot}", report.as_uri())
    assert done.returncode == 0, done.stderr[-3000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG")
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (width, height) == (WIDTH, 1800)
    shutil.copy(shot, report.with_name("screenshot-1280.png"))  # to look at by hand

    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", MEASURE + "</body>"))
    done = run_browser("--dump-dom", probe.as_uri())
    assert done.returncode == 0, done.stderr[-3000:]
    title = re.search(r"<title>(.*?)</title>", done.stdout, re.S)
    assert title, done.stdout[:2000]
    facts = json.loads(title.group(1).replace("&quot;", '"'))
    assert facts["page"] <= facts["viewport"] == WIDTH, facts  # no horizontal scrolling
    assert facts["table"] <= WIDTH, facts
    assert facts["first"] == "H1 meta", facts  # the run's metadata before any figure
    assert facts["images"] and all(facts["images"]), facts
