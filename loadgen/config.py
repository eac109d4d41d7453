"""The load generator's typed, validated configuration.

Filled at the boundary (`loadgen.cli`) and passed down explicitly. `Connection` and `LevelPlan`
also travel from the master to the workers in distributed runs, so they convert to and from
plain dicts (msgpack carries nothing else).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgen.errors import UsageError

MODES = ("unary", "stream")
APIS = ("asr", "google", "riva")  # loadgen.apis: whisper-grpc's own, Google's, Riva's
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "whisper-grpc" / "datasets"


class ConfigError(UsageError, ValueError):
    """A flag has a value the load generator cannot run with; the message names the flag."""


@dataclass(frozen=True)
class Connection:
    """How every user reaches the server."""

    target: str
    """HOST:PORT of the Speech server."""
    tls: bool = False
    """Use TLS (the system roots, or `ca_pem`)."""
    ca_pem: bytes | None = None
    """PEM root certificates to trust instead of the system roots (the file's content, so a
    worker on another host does not need the file)."""
    metadata: tuple[tuple[str, str], ...] = ()
    """gRPC metadata sent with every call (keys lower-case, as gRPC requires)."""
    client_cert_pem: bytes | None = None
    """PEM client certificate chain for mutual TLS (the content, as `ca_pem`)."""
    client_key_pem: bytes | None = None
    """PEM private key of `client_cert_pem`."""
    timeout_s: float = 120.0
    """Deadline of one call, seconds."""
    channels: int = 1
    """gRPC channels (HTTP/2 connections) per load-generator process; users share them."""
    mode: str = "unary"
    """`unary` (Recognize) or `stream` (StreamingRecognize)."""
    api: str = "asr"
    """Which API's requests to send: `asr` (asr.v1), `google` (google.cloud.speech.v1) or
    `riva` (nvidia.riva.asr)."""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["metadata"] = [list(pair) for pair in self.metadata]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Connection:
        values = dict(data)
        values["metadata"] = tuple((str(k), str(v)) for k, v in values.get("metadata", ()))
        return cls(**values)


@dataclass(frozen=True)
class LevelPlan:
    """One load level as every process needs to know it."""

    index: int
    """Position in the sweep; users start a fresh pacing when it changes."""
    mode: str
    """`closed` (a fixed number of users, each waiting for its response) or `open` (Poisson
    arrivals at a fixed rate, whatever the responses do)."""
    users: int
    """Locust users in all processes together."""
    concurrency: int | None = None
    """Closed loop: requests in flight, one per user."""
    rate: float | None = None
    """Open loop: total arrivals per second."""
    seed: int = 0
    """Seeds the arrival schedules of this level."""
    max_inflight: int = 1000
    """Open loop: arrivals beyond this many unanswered calls per process are dropped."""
    late_ms: float = 20.0
    """Open loop: a call sent more than this after its scheduled time counts as late."""

    @property
    def rate_per_user(self) -> float:
        return (self.rate or 0.0) / max(self.users, 1)

    @property
    def x(self) -> float:
        """The level's value on a plot's x axis: concurrency or rate."""
        value = self.concurrency if self.mode == "closed" else self.rate
        return float(value or 0)

    def describe(self) -> str:
        return f"c={self.concurrency}" if self.mode == "closed" else f"rate={self.rate:g}/s"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LevelPlan:
        return cls(**data)


@dataclass(frozen=True)
class RunConfig:
    """Everything `loadgen run` needs (the master's view in a distributed run)."""

    connection: Connection
    dataset: str
    out: Path
    concurrency: tuple[int, ...] = ()
    rates: tuple[float, ...] = ()
    duration_s: float = 30.0
    """Measurement window per level (each window, with `stability`)."""
    warmup_s: float = 5.0
    """Load before the measurement starts, per level; its requests are not counted."""
    stability: bool = False
    """Repeat windows until the last three agree within `stability_tolerance` on throughput and
    p99 (perf_analyzer's rule), at most `max_windows`; the level reports those three."""
    max_windows: int = 10
    stability_tolerance: float = 0.10
    limit: int | None = None
    """Use at most this many files (a seeded sample)."""
    seed: int = 0
    label: str = ""
    price_per_hour: float | None = None
    max_inflight: int = 1000
    late_ms: float = 20.0
    generators: int = 1
    """Open loop: Poisson generators (Locust users) per process; their sum is the rate."""
    wait_ready_s: float = 60.0
    """Wait this long for the server's health to say SERVING before starting."""
    progress_interval_s: float = 2.0
    cache_dir: Path = field(default_factory=lambda: DEFAULT_CACHE_DIR)
    base_url: str = ""
    master: bool = False
    expect_workers: int = 0
    master_bind_host: str = "*"
    master_bind_port: int = 5557
    worker_timeout_s: float = 120.0
    """Distributed: how long the master waits for `expect_workers` workers to connect."""

    def __post_init__(self) -> None:
        _check_connection(self.connection)
        if not self.concurrency and not self.rates:
            raise ConfigError("give --concurrency and/or --rate")
        if any(c < 1 for c in self.concurrency):
            raise ConfigError(f"--concurrency values must be >= 1, not {self.concurrency}")
        if any(not (math.isfinite(r) and r > 0) for r in self.rates):
            raise ConfigError(f"--rate values must be > 0, not {self.rates}")
        if not self.duration_s > 0:
            raise ConfigError(f"--duration must be > 0, not {self.duration_s}")
        if self.warmup_s < 0:
            raise ConfigError(f"--warmup must be >= 0, not {self.warmup_s}")
        if self.stability and self.max_windows < 3:
            raise ConfigError(
                f"--max-windows must be >= 3 with --stability, not {self.max_windows}"
            )
        if not 0 < self.stability_tolerance < 1:
            raise ConfigError("--stability-tolerance must be in (0, 1)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, not {self.limit}")
        if self.price_per_hour is not None and self.price_per_hour < 0:
            raise ConfigError("--price-per-hour must be >= 0")
        if self.max_inflight < 1 or self.generators < 1:
            raise ConfigError("--max-inflight and --generators must be >= 1")
        if self.master and self.expect_workers < 1:
            raise ConfigError("--master needs --expect-workers N (N >= 1)")

    @property
    def processes(self) -> int:
        """Processes that generate load: the workers, or this one."""
        return self.expect_workers if self.master else 1

    def levels(self) -> list[LevelPlan]:
        """The sweep: closed-loop levels first, then open-loop ones, in the order given."""
        plans: list[LevelPlan] = []
        for c in self.concurrency:
            plans.append(self._plan(len(plans), "closed", c, concurrency=c))
        for r in self.rates:
            plans.append(self._plan(len(plans), "open", self.generators * self.processes, rate=r))
        return plans

    def _plan(self, index: int, mode: str, users: int, **level: Any) -> LevelPlan:
        return LevelPlan(
            index,
            mode,
            users,
            seed=self.seed,
            max_inflight=self.max_inflight,
            late_ms=self.late_ms,
            **level,
        )


def _check_connection(conn: Connection) -> None:
    host, sep, port = conn.target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--target must be HOST:PORT, not {conn.target!r}")
    if conn.mode not in MODES:
        raise ConfigError(f"--mode must be one of {MODES}, not {conn.mode!r}")
    if conn.api not in APIS:
        raise ConfigError(f"--api must be one of {APIS}, not {conn.api!r}")
    if not conn.timeout_s > 0:
        raise ConfigError(f"--timeout must be > 0, not {conn.timeout_s}")
    if conn.channels < 1:
        raise ConfigError(f"--channels must be >= 1, not {conn.channels}")
    if conn.ca_pem is not None and not conn.tls:
        raise ConfigError("--ca-cert needs --tls")
    if (conn.client_cert_pem is None) != (conn.client_key_pem is None):
        raise ConfigError("--client-cert and --client-key go together")
    if conn.client_cert_pem is not None and not conn.tls:
        raise ConfigError("--client-cert needs --tls")


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise ConfigError(f"{flag} takes comma-separated integers, not {text!r}") from err


def parse_float_list(text: str, flag: str) -> tuple[float, ...]:
    """'0.5,1,2' -> (0.5, 1.0, 2.0)."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise ConfigError(f"{flag} takes comma-separated numbers, not {text!r}") from err


TOKEN_FILE_ENV = "LOADGEN_TOKEN_FILE"


def bearer_metadata(token_file: Path | None) -> tuple[tuple[str, str], ...]:
    """`authorization: Bearer <token>` from the first token line of a file (a Docker secret,
    say), so the token never appears on a command line or in a run's summary."""
    if token_file is None:
        return ()
    lines = token_file.read_text(encoding="utf-8").splitlines()
    tokens = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not tokens:
        raise ConfigError(f"--token-file {token_file} holds no token")
    return (("authorization", f"Bearer {tokens[0]}"),)


def parse_metadata(pairs: list[str]) -> tuple[tuple[str, str], ...]:
    """['Key=v', ...] -> (('key', 'v'), ...): gRPC metadata keys must be lower-case."""
    parsed = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--metadata takes key=value, not {pair!r}")
        parsed.append((key.strip().lower(), value))
    return tuple(parsed)
