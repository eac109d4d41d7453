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
    streams: int | None = None
    """Live streams (`stream` mode): concurrent streams, one per user, each opening the next
    stream when its last one ends."""
    pace: float = 1.0
    """Streams: audio seconds sent per second (1.0 real time; inf: as fast as gRPC takes it)."""
    chunk_ms: int = 100
    """Streams: audio per StreamingRecognize message."""
    utterances: int = 1
    """Streams: files per stream, with `gap_ms` of silence between them (endpointing)."""
    gap_ms: int = 1500
    behind_ms: float = 500.0
    """Streams: a chunk sent more than this after its real-time due time means the stream
    fell behind real time."""
    interim_interval_ms: int = 0
    """Streams: the server's interim cadence to ask for (0: the server's default)."""

    @property
    def rate_per_user(self) -> float:
        return (self.rate or 0.0) / max(self.users, 1)

    @property
    def x(self) -> float:
        """The level's value on a plot's x axis: concurrency or rate."""
        if self.mode == "stream":
            return float(self.streams or 0)
        value = self.concurrency if self.mode == "closed" else self.rate
        return float(value or 0)

    def describe(self) -> str:
        if self.mode == "stream":
            return f"streams={self.streams}"
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
    streams: tuple[int, ...] = ()
    """Live-stream levels (`--mode stream`): concurrent real-time streams."""
    pace: float = 1.0
    chunk_ms: int = 100
    utterances: int = 1
    gap_ms: int = 1500
    behind_ms: float = 500.0
    interim_interval_ms: int = 0
    find_capacity: bool = False
    """Search (grow, then bisect) for the highest level that meets the SLO, starting from the
    first level given, instead of sweeping the levels given."""
    slo_p99_ms: float | None = None
    """Unary SLO for --find-capacity: p99 latency at most this."""
    slo_final_p99_ms: float | None = None
    """Stream SLO for --find-capacity: p99 final lag at most this."""
    max_capacity: float = 1024.0
    """--find-capacity does not probe above this level."""
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
        self._check_streams()
        self._check_capacity()
        if not self.concurrency and not self.rates and not self.streams:
            raise ConfigError("give --concurrency and/or --rate (or --streams with --mode stream)")
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

    def _check_streams(self) -> None:
        if self.connection.mode == "stream" and (self.concurrency or self.rates):
            raise ConfigError(
                "--mode stream takes its levels from --streams N,N,... (live streams, paced "
                "by --pace), not --rate, nor --concurrency beside --streams"
            )
        if self.streams and self.connection.mode != "stream":
            raise ConfigError("--streams needs --mode stream")
        if any(n < 1 for n in self.streams):
            raise ConfigError(f"--streams values must be >= 1, not {self.streams}")
        if not self.pace > 0:
            raise ConfigError(f"--pace must be > 0 or max, not {self.pace}")
        if not 10 <= self.chunk_ms <= 5000:
            raise ConfigError(f"--chunk-ms must be 10..5000, not {self.chunk_ms}")
        if not 1 <= self.utterances <= 100:
            raise ConfigError(f"--utterances must be 1..100, not {self.utterances}")
        if not 0 <= self.gap_ms <= 60_000 or not self.behind_ms > 0:
            raise ConfigError("--gap-ms must be 0..60000 and --behind-ms > 0")
        if self.interim_interval_ms < 0:
            raise ConfigError("--interim-interval-ms must be >= 0")

    def _check_capacity(self) -> None:
        if not self.find_capacity:
            if self.slo_p99_ms is not None or self.slo_final_p99_ms is not None:
                raise ConfigError("--slo-p99-ms / --slo-final-p99-ms go with --find-capacity")
            return
        kinds = [bool(self.concurrency), bool(self.rates), bool(self.streams)]
        if sum(kinds) != 1 or len(self.concurrency + self.rates + self.streams) != 1:
            raise ConfigError(
                "--find-capacity starts from one level: give exactly one of --concurrency N, "
                "--rate R or --streams N"
            )
        if self.streams:
            if self.slo_final_p99_ms is None or self.slo_p99_ms is not None:
                raise ConfigError("--find-capacity with --streams needs --slo-final-p99-ms")
        elif self.slo_p99_ms is None or self.slo_final_p99_ms is not None:
            raise ConfigError("--find-capacity with --concurrency/--rate needs --slo-p99-ms")
        slo = self.slo_p99_ms if self.slo_final_p99_ms is None else self.slo_final_p99_ms
        if not (slo or 0) > 0:
            raise ConfigError("the SLO must be > 0 ms")
        if self.max_capacity < max(self.concurrency + self.rates + self.streams):
            raise ConfigError("--max-capacity must be at least the starting level")

    @property
    def capacity_mode(self) -> str:
        """What --find-capacity searches: `closed` (concurrency), `open` (rate), `stream`."""
        return "stream" if self.streams else "open" if self.rates else "closed"

    @property
    def capacity_slo_ms(self) -> float:
        value = self.slo_final_p99_ms if self.streams else self.slo_p99_ms
        assert value is not None
        return value

    def plan_at(self, index: int, mode: str, x: float) -> LevelPlan:
        """The plan of one level: concurrency, rate or streams x (a capacity probe)."""
        if mode == "stream":
            return self._plan(index, "stream", int(x), streams=int(x), **self._stream_fields())
        if mode == "open":
            return self._plan(index, "open", self.generators * self.processes, rate=x)
        return self._plan(index, "closed", int(x), concurrency=int(x))

    def _stream_fields(self) -> dict[str, Any]:
        return {
            "pace": self.pace,
            "chunk_ms": self.chunk_ms,
            "utterances": self.utterances,
            "gap_ms": self.gap_ms,
            "behind_ms": self.behind_ms,
            "interim_interval_ms": self.interim_interval_ms,
        }

    @property
    def processes(self) -> int:
        """Processes that generate load: the workers, or this one."""
        return self.expect_workers if self.master else 1

    def levels(self) -> list[LevelPlan]:
        """The sweep: closed-loop levels first, then open-loop ones, then streams, in the order
        given."""
        plans: list[LevelPlan] = []
        for mode, values in (
            ("closed", self.concurrency),
            ("open", self.rates),
            ("stream", self.streams),
        ):
            for value in values:
                plans.append(self.plan_at(len(plans), mode, value))
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
