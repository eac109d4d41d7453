"""Freed heap memory goes back to the OS: malloc_trim on glibc, the server's periodic trimmer."""

from __future__ import annotations

import asyncio
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from server.config import Settings
from server.embedded import EmbeddedServer
from server.memory import HeapTrimmer, malloc_trim
from server.models.fake import FakeModel

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not malloc_trim(), reason="needs glibc's malloc_trim"
)


def rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


@glibc
def test_malloc_trim_returns_fragmented_free_heap_to_the_os() -> None:
    """What a server's heap looks like after a burst: most small-to-medium blocks freed, a few
    kept between them. glibc keeps the free pages mapped (RSS stays) until malloc_trim."""

    def burst() -> tuple[float, float, float]:
        blocks = [np.ones(100 * 1024, np.uint8) for _ in range(2000)]  # about 200 MiB of heap
        kept = blocks[::20]  # every 20th survives: the free space between can't shrink the top
        del blocks
        before = rss_mib()
        assert malloc_trim()
        after = rss_mib()
        return before, after, float(len(kept))

    result: list[tuple[float, float, float]] = []
    # A thread of its own: its own arena, as a server's worker thread has.
    thread = threading.Thread(target=lambda: result.append(burst()))
    thread.start()
    thread.join()
    before, after, _ = result[0]
    assert before - after > 100, (before, after)


def test_the_trimmer_runs_every_interval_until_stopped() -> None:
    async def main() -> int:
        ran = asyncio.Event()
        loop = asyncio.get_running_loop()
        calls = []

        def trim() -> bool:
            calls.append(1)
            if len(calls) == 3:
                loop.call_soon_threadsafe(ran.set)
            return True

        trimmer = HeapTrimmer(0.01, trim).start()
        await asyncio.wait_for(ran.wait(), 30)
        trimmer.stop()
        return len(calls)

    assert asyncio.run(main()) >= 3


def test_no_trimmer_when_turned_off() -> None:
    async def main() -> bool:
        trimmer = HeapTrimmer(0.0, lambda: True).start()
        return trimmer._task is None

    assert asyncio.run(main())


def test_the_server_trims_by_default() -> None:
    assert Settings().malloc_trim_s > 0
    server = EmbeddedServer(Settings(malloc_trim_s=5), FakeModel()).start()
    try:
        assert server.handle is not None and server.handle.trimmer is not None
        assert server.handle.trimmer.interval_s == 5 and server.handle.trimmer._task is not None
    finally:
        server.stop()


_BURST = """
import re, sys
from pathlib import Path
import numpy as np
from server.memory import tune_malloc

def rss():
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\\s+(\\d+)", status).group(1)) / 1024

if sys.argv[1] == "tuned":
    assert tune_malloc(1024, 2)
np.ones(2 << 20, np.uint8).sum()  # freed at once: glibc raises its threshold past 2 MiB
start = rss()
blocks = [np.ones(2 << 20, np.uint8) for _ in range(100)]  # 200 MiB, as a batch's tensors
kept = blocks[::10]
del blocks
print(rss() - start)
"""


def _retained_mib(mode: str) -> float:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", _BURST, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    return float(out.stdout.strip())


@glibc
@pytest.mark.slow  # a Python subprocess: a fresh heap to measure
def test_a_fixed_mmap_threshold_returns_freed_tensors_at_once() -> None:
    """With glibc's dynamic threshold, 2 MiB blocks freed between kept ones stay mapped (RSS
    holds about the whole burst); with the server's settings only the kept blocks do."""
    assert _retained_mib("default") > 150
    assert _retained_mib("tuned") < 60
