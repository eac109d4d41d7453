"""Import this first in every load-generating process: it lets Locust monkey-patch the standard
library with gevent (Locust does so when imported), then switches gRPC to gevent. Without
`init_gevent()` before the first channel, a blocking gRPC call under gevent hangs the process.
"""

from __future__ import annotations

import locust  # noqa: F401  (imported for its side effect: gevent monkey-patching)
from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()
