"""whisper-grpc load generator: Locust used as a library to sweep a Speech server over
concurrency (closed loop) or arrival rate (open loop) with real audio, and report latency,
throughput (RTFx), WER and the server's own timing per level.

Only `loadgen.users`, `loadgen.client`, `loadgen.control`, `loadgen.runner`,
`loadgen.distributed` and `loadgen.locustfile` import Locust (which monkey-patches the process
with gevent); the rest (dataset, schedule, stats, report, compare, fetch, config) is plain Python
and safe to import anywhere, tests included.
"""

from __future__ import annotations

from importlib import metadata


def _version() -> str:
    try:
        return metadata.version("whisper-grpc")
    except metadata.PackageNotFoundError:  # a source checkout that was never installed
        return "0.0.0+local"


__version__ = _version()
