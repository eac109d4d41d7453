"""whisper-grpc's one home of measuring (`python -m loadgen`, see `loadgen.cli`).

The load generator: Locust used as a library to sweep a Speech server over
concurrency (closed loop), arrival rate (open loop) or concurrent live streams (paced in real
time) with real audio, and report latency (final lag and interim latency, for streams),
throughput (RTFx), WER and the server's own timing per level, or search for the highest level
within an SLO.

Only `loadgen.users`, `loadgen.client`, `loadgen.control`, `loadgen.runner`,
`loadgen.distributed` and `loadgen.locustfile` import Locust (which monkey-patches the process
with gevent); the rest (dataset, schedule, live, capacity, stats, report, compare, fetch,
config) is plain Python and safe to import anywhere, tests included.

The shared layers: `dataset` (LibriSpeech, plain folders, the shipped sample, references,
decoded clips), `stats` (records, percentiles, intervals), `writers` (CSV, JSON, Markdown),
`plots` (matplotlib set-up), `costs` (cost per 1,000 audio hours, price parsing), `spawn`
(start a server and wait for SERVING), `wer` (word error rate). The in-process side
(`loadgen.inprocess`: study, engines, precision; torch and transformers) and `soak` are
imported only by their commands.
"""

from __future__ import annotations

from importlib import metadata


def _version() -> str:
    try:
        return metadata.version("whisper-grpc")
    except metadata.PackageNotFoundError:  # a source checkout that was never installed
        return "0.0.0+local"


__version__ = _version()
