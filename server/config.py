"""Settings: the one typed, validated configuration of the server.

Filled at the boundary (command-line flags and `WHISPER_GRPC_*` environment variables, in
`server.cli`) and passed down explicitly; no inner module reads the environment.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "tiny.en"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DTYPES = ("auto", "float32", "float16", "bfloat16")
ENGINES = ("continuous", "generate")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


class SettingsError(ValueError):
    """A setting has a value the server cannot run with; the message names the setting."""


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to start. Each field documents its unit and bounds."""

    host: str = "0.0.0.0"
    """Address to listen on."""
    port: int = 50051
    """gRPC port; 0 picks a free one (tests)."""
    model: str = DEFAULT_MODEL
    """Built-in name (`tiny.en`, `base`), a local checkpoint directory, or a Hugging Face hub id."""
    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:N`."""
    dtype: str = "auto"
    """`auto` (float16 on GPU, float32 on CPU), `float32`, `float16`, `bfloat16`."""
    engine: str = "continuous"
    """How windows are batched: `continuous` (the decoder runs one token at a time over every
    window in flight; windows join and leave between steps) or `generate` (micro-batches of
    whole windows through transformers' `generate`). Models without a continuous runtime
    (the fake test model) always use `generate`."""
    max_batch_size: int = 8
    """Most 30 s windows in one model call (with `continuous`: in one encoder pass), 1..256."""
    max_active: int = 16
    """With `continuous`: most windows decoding at once (each holds its decoder caches,
    about 23 MiB for tiny.en in fp32, 305 MiB for large-v3 in fp16), 1..1024."""
    max_join_share: float = 1.0
    """With `continuous`: new windows wait while a decoding window has spent more than this
    share of its decoding time held up by other windows' encoder passes, (0, 1]; 1: off.
    Lower trades throughput and p50 for a shorter tail (p99) under steady load."""
    max_wait_ms: float = 10.0
    """Longest a batch waits to fill after its first item arrived, 0..10000 ms."""
    max_prepare_wait_ms: float = 100.0
    """A batch that isn't full may wait up to this long for requests already received and
    still being decoded, 0..10000 ms (never less than max_wait_ms)."""
    max_queue_size: int = 256
    """Windows waiting for the model; beyond it requests get RESOURCE_EXHAUSTED, 1..100000."""
    max_audio_s: float = 600.0
    """Longest audio accepted per request, in seconds, 1..14400."""
    max_message_mb: float = 64.0
    """Largest gRPC message accepted, in MiB, 1..2047."""
    metrics_port: int = 9090
    """Prometheus metrics HTTP port; -1 disables, 0 picks a free one."""
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR."""
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "whisper-grpc")
    """Where built-in models are converted to transformers checkpoints (once)."""
    num_threads: int = 0
    """Torch CPU threads; 0 = all cores."""
    grace_s: float = 30.0
    """On SIGTERM, how long queued and running work may take to finish, 0..3600 s."""
    warmup: bool = True
    """Run the model once per batch size at start-up, before reporting SERVING."""
    max_new_tokens: int = 440
    """Decoder token limit per 30 s window, 1..440 (Whisper's context is 448 with the prompt)."""
    max_beam_size: int = 5
    """Largest beam a client may ask for, 1..16."""
    no_speech_threshold: float = 0.6
    """A window whose no-speech probability is above this gives no text, 0..1 (1: off)."""
    silence_dbfs: float = -60.0
    """A window whose loudest 20 ms frame is below this level is not decoded, -200..0 dBFS."""
    max_streams: int = 64
    """Concurrent StreamingRecognize calls; beyond it RESOURCE_EXHAUSTED, 1..10000."""
    max_stream_s: float = 3600.0
    """Longest audio one stream may send, seconds, 1..86400."""
    stream_buffer_s: float = 30.0
    """Audio a stream may send ahead of recognition before the server stops reading (flow
    control slows the client down), seconds, 1..600."""
    stream_idle_timeout_s: float = 30.0
    """A stream that sends no audio for this long ends with DEADLINE_EXCEEDED, 1..3600 s."""
    endpoint_silence_ms: int = 700
    """Default silence after speech that ends an utterance (a final), 100..10000 ms."""
    interim_interval_ms: int = 1000
    """Default new audio between interim re-decodes, 200..10000 ms."""

    # -- security and connection limits ---------------------------------------------------
    metrics_host: str = ""
    """Address of the metrics endpoint; empty: the same as `host`."""
    tls_cert: Path | None = None
    """PEM certificate chain of the server; with `tls_key`, gRPC speaks TLS only."""
    tls_key: Path | None = None
    """PEM private key of `tls_cert`."""
    tls_client_ca: Path | None = None
    """PEM CA bundle: clients must present a certificate it signed (mutual TLS)."""
    auth_token_file: Path | None = None
    """Bearer tokens, one per line (`#` comments): every `asr.v1` call needs
    `authorization: Bearer <token>`; health and reflection stay open."""
    max_calls_per_client: int = 0
    """Concurrent calls (unary and streams) per client (its token, else its address); beyond:
    RESOURCE_EXHAUSTED. 0: no cap (behind a proxy all clients share its address), 0..100000."""
    max_streams_per_client: int = 0
    """Concurrent streams per client, as above; 0: no cap, 0..10000."""
    max_concurrent_rpcs: int = 4096
    """Calls in progress on the whole server (health included); beyond, gRPC itself answers
    RESOURCE_EXHAUSTED, 1..1000000."""
    max_streams_per_connection: int = 256
    """HTTP/2 streams (calls) one connection may have open; more wait on the client, 1..100000."""
    max_connections: int = 1024
    """Open client connections; more are refused, 1..100000."""
    keepalive_time_s: float = 60.0
    """The server pings a connection quiet for this long and drops it when no answer comes
    within `keepalive_timeout_s` (dead peers free their slots), 1..86400 s."""
    keepalive_timeout_s: float = 20.0
    """How long a keepalive ping may go unanswered, 1..3600 s."""
    min_ping_interval_s: float = 10.0
    """Clients pinging more often than this are sent GOAWAY (ping floods), 1..3600 s."""
    max_connection_age_s: float = 0.0
    """Connections older than this are closed gracefully (clients reconnect, so load
    rebalances across replicas); 0: never, 0..604800 s."""

    @property
    def metrics_bind_host(self) -> str:
        return self.metrics_host or self.host

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def __post_init__(self) -> None:
        _check_range("port", self.port, 0, 65535)
        _check_range("max_batch_size", self.max_batch_size, 1, 256)
        _check_range("max_active", self.max_active, 1, 1024)
        _check_range("max_join_share", self.max_join_share, 0.01, 1)
        _check_range("max_wait_ms", self.max_wait_ms, 0, 10_000)
        _check_range("max_prepare_wait_ms", self.max_prepare_wait_ms, 0, 10_000)
        _check_range("max_queue_size", self.max_queue_size, 1, 100_000)
        _check_range("max_audio_s", self.max_audio_s, 1, 14_400)
        _check_range("max_message_mb", self.max_message_mb, 1, 2047)
        _check_range("metrics_port", self.metrics_port, -1, 65535)
        _check_range("num_threads", self.num_threads, 0, 1024)
        _check_range("grace_s", self.grace_s, 0, 3600)
        _check_range("max_new_tokens", self.max_new_tokens, 1, 440)
        _check_range("max_beam_size", self.max_beam_size, 1, 16)
        _check_range("no_speech_threshold", self.no_speech_threshold, 0, 1)
        _check_range("silence_dbfs", self.silence_dbfs, -200, 0)
        _check_range("max_streams", self.max_streams, 1, 10_000)
        _check_range("max_stream_s", self.max_stream_s, 1, 86_400)
        _check_range("stream_buffer_s", self.stream_buffer_s, 1, 600)
        _check_range("stream_idle_timeout_s", self.stream_idle_timeout_s, 1, 3600)
        _check_range("endpoint_silence_ms", self.endpoint_silence_ms, 100, 10_000)
        _check_range("interim_interval_ms", self.interim_interval_ms, 200, 10_000)
        self._check_security()
        if self.max_queue_size < self.max_batch_size:
            raise SettingsError(
                f"max_queue_size ({self.max_queue_size}) must be at least max_batch_size "
                f"({self.max_batch_size}), or no batch could ever fill"
            )
        if not _DEVICE_RE.match(self.device):
            raise SettingsError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.engine not in ENGINES:
            raise SettingsError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.dtype not in DTYPES:
            raise SettingsError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise SettingsError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if not self.model.strip():
            raise SettingsError("model must not be empty")
        if self.device == "cpu" and self.dtype == "float16":
            raise SettingsError("dtype float16 needs a GPU; use float32 or bfloat16 on the CPU")

    def _check_security(self) -> None:
        _check_range("max_calls_per_client", self.max_calls_per_client, 0, 100_000)
        _check_range("max_streams_per_client", self.max_streams_per_client, 0, 10_000)
        _check_range("max_concurrent_rpcs", self.max_concurrent_rpcs, 1, 1_000_000)
        _check_range("max_streams_per_connection", self.max_streams_per_connection, 1, 100_000)
        _check_range("max_connections", self.max_connections, 1, 100_000)
        _check_range("keepalive_time_s", self.keepalive_time_s, 1, 86_400)
        _check_range("keepalive_timeout_s", self.keepalive_timeout_s, 1, 3600)
        _check_range("min_ping_interval_s", self.min_ping_interval_s, 1, 3600)
        _check_range("max_connection_age_s", self.max_connection_age_s, 0, 604_800)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SettingsError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SettingsError(f"{name} must be a number, not {value!r}")
    if not low <= value <= high:
        raise SettingsError(f"{name} must be between {low} and {high}, not {value}")
