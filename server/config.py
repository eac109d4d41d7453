"""Settings: the one typed, validated configuration of the server.

Filled at the boundary (command-line flags and `WHISPER_GRPC_*` environment variables, in
`server.cli`) and passed down explicitly; no inner module reads the environment. Each numeric
setting carries its bounds (`bounded(default, low, high)`), checked once here; the engines'
configs check the fields they share with Settings against the same bounds.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "tiny.en"
"""The embedded default model (converted offline from a PyPI package)."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DTYPES = ("auto", "float32", "float16", "bfloat16")
ENGINES = ("continuous", "generate")
COMPILE_MODES = ("auto", "on", "off")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def bounded(default: Any, low: float, high: float) -> Any:
    """A numeric setting with its bounds beside it (checked in `__post_init__`, and by the
    engines' own configs through `check_bounds`)."""
    return field(default=default, metadata={"bounds": (low, high)})


class SettingsError(ValueError):
    """A setting has a value the server cannot run with; the message names the setting."""


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to start. Each field documents its unit and bounds."""

    host: str = "0.0.0.0"
    """Address to listen on."""
    port: int = bounded(50051, 0, 65535)
    """gRPC port; 0 picks a free one (tests)."""
    model: str = DEFAULT_MODEL
    """Built-in name (`tiny.en`, `base`), a local checkpoint directory, or a Hugging Face hub id."""
    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:N`."""
    dtype: str = "auto"
    """`auto` (float16 on a GPU; bfloat16 on a CPU with native bf16 matrix instructions,
    AMX or AVX512-BF16; float32 on other CPUs), `float32`, `float16`, `bfloat16`."""
    engine: str = "continuous"
    """How windows are batched: `continuous` (the decoder runs one token at a time over every
    window in flight; windows join and leave between steps) or `generate` (micro-batches of
    whole windows through transformers' `generate`). Models without a continuous runtime
    (the fake test model) always use `generate`."""
    max_batch_size: int = bounded(8, 1, 256)
    """Most 30 s windows in one model call (with `continuous`: in one encoder pass), 1..256."""
    compile: str = "auto"
    """With `continuous`: how the decode step runs. `auto`: on a CPU compiled by
    `torch.compile` (inductor) when a C++ compiler is usable, else eager (the log says why);
    on CUDA captured as CUDA graphs, one per row bucket (1, 2, 4, ... max_active). `on`: the
    same, failing at start-up without a compiler. `off`: eager. Compiling happens at warm-up,
    before SERVING (kept under `cache_dir`/inductor across restarts)."""
    max_active: int = bounded(16, 1, 1024)
    """With `continuous`: most windows decoding at once (each holds its decoder caches,
    about 23 MiB for tiny.en in fp32, 305 MiB for large-v3 in fp16), 1..1024."""
    max_join_share: float = bounded(1.0, 0.01, 1)
    """With `continuous`: new windows wait while a decoding window has spent more than this
    share of its decoding time held up by other windows' encoder passes, (0, 1]; 1: off.
    Lower trades throughput and p50 for a shorter tail (p99) under steady load."""
    max_fallback_share: float = bounded(0.25, 0.01, 1)
    """With `continuous`: the most of the model worker's time a `generate` fallback (beam
    search, temperature, prompts) takes while other windows are decoding, (0, 1]: between its
    tokens, windows in the shared decode step for the rest. 1: a fallback runs to its end
    while the others wait."""
    max_wait_ms: float = bounded(10.0, 0, 10_000)
    """Longest a batch waits to fill after its first item arrived, 0..10000 ms."""
    max_prepare_wait_ms: float = bounded(100.0, 0, 10_000)
    """A batch that isn't full may wait up to this long for requests already received and
    still being decoded, 0..10000 ms (never less than max_wait_ms)."""
    max_queue_size: int = bounded(256, 1, 100_000)
    """Windows waiting for the model; beyond it requests get RESOURCE_EXHAUSTED, 1..100000."""
    max_audio_s: float = bounded(600.0, 1, 14_400)
    """Longest audio accepted per request, in seconds, 1..14400."""
    max_message_mb: float = bounded(64.0, 1, 2047)
    """Largest gRPC message accepted, in MiB, 1..2047."""
    metrics_port: int = bounded(9090, -1, 65535)
    """Prometheus metrics HTTP port; -1 disables, 0 picks a free one."""
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING or ERROR."""
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())
    """Where built-in models are converted to transformers checkpoints (once)."""
    num_threads: int = bounded(0, 0, 1024)
    """Torch CPU threads; 0 = all cores."""
    grace_s: float = bounded(30.0, 0, 3600)
    """On SIGTERM, how long queued and running work may take to finish, 0..3600 s."""
    max_connection_age_s: float = bounded(0.0, 0, 86_400)
    """Close each client connection (HTTP/2 GOAWAY) after about this long, so clients behind
    a connection balancer (a Kubernetes Service) reconnect and spread over new replicas;
    gRPC adds ±10% jitter so connections don't all reconnect at once. 0: off, 0..86400 s."""
    max_connection_age_grace_s: float = bounded(3600.0, 0, 86_400)
    """After that GOAWAY, how long calls already in flight on the connection may still take
    before it is closed, 0..86400 s; cover the longest call (a stream: max_stream_s)."""
    warmup: bool = True
    """Run the model once per batch size at start-up, before reporting SERVING."""
    max_new_tokens: int = bounded(440, 1, 440)
    """Decoder token limit per 30 s window, 1..440 (Whisper's context is 448 with the prompt)."""
    max_beam_size: int = bounded(5, 1, 16)
    """Largest beam a client may ask for, 1..16."""
    no_speech_threshold: float = bounded(0.6, 0, 1)
    """A window whose no-speech probability is above this gives no text, 0..1 (1: off)."""
    silence_dbfs: float = bounded(-60.0, -200, 0)
    """A window whose loudest 20 ms frame is below this level is not decoded, -200..0 dBFS."""
    max_streams: int = bounded(64, 1, 10_000)
    """Concurrent StreamingRecognize calls; beyond it RESOURCE_EXHAUSTED, 1..10000."""
    max_stream_s: float = bounded(3600.0, 1, 86_400)
    """Longest audio one stream may send, seconds, 1..86400."""
    stream_buffer_s: float = bounded(30.0, 1, 600)
    """Audio a stream may send ahead of recognition before the server stops reading (flow
    control slows the client down), seconds, 1..600."""
    stream_idle_timeout_s: float = bounded(30.0, 1, 3600)
    """A stream that sends no audio for this long ends with DEADLINE_EXCEEDED, 1..3600 s."""
    endpoint_silence_ms: int = bounded(1200, 100, 10_000)
    """Default silence after speech that ends an utterance (a final), 100..10000 ms. Whisper
    transcribes a sentence cut at a pause worse than the whole sentence: 700 ms cut 19 of 100
    LibriSpeech test-other files mid-sentence, 1200 ms 4."""
    interim_interval_ms: int = bounded(1000, 200, 10_000)
    """Default new audio between interim re-decodes, 200..10000 ms."""
    malloc_mmap_threshold_kb: int = bounded(4096, 0, 32_768)
    """glibc malloc: blocks from this size up are mapped apart and returned to the OS when
    freed, 0..32768 KiB; 0: glibc's dynamic threshold, which rises to 32 MiB and leaves freed
    tensors' memory mapped in the heap (RSS grows). Set at start-up by `python -m server`."""
    malloc_arena_max: int = bounded(2, 0, 1024)
    """glibc malloc: most arenas (heaps), 0..1024; 0: glibc's default of 8 per core, each
    thread's arena keeping its own free memory. Set at start-up by `python -m server`."""
    malloc_trim_s: float = bounded(30.0, 0, 3600)
    """Every this many seconds, return the heap memory freed since to the OS (glibc
    `malloc_trim`), so RSS follows what is in use rather than the high-water mark of every
    allocator arena, 0..3600 s; 0: never."""

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
    """Bearer tokens, one per line (`#` comments): every call to the speech APIs (asr.v1,
    Google, Riva) needs `authorization: Bearer <token>`; health and reflection stay open."""
    max_calls_per_client: int = bounded(0, 0, 100_000)
    """Concurrent calls (unary and streams) per client (its token, else its address); beyond:
    RESOURCE_EXHAUSTED. 0: no cap (behind a proxy all clients share its address), 0..100000."""
    max_streams_per_client: int = bounded(0, 0, 10_000)
    """Concurrent streams per client, as above; 0: no cap, 0..10000."""
    max_concurrent_rpcs: int = bounded(4096, 1, 1_000_000)
    """Calls in progress on the whole server (health included); beyond, gRPC itself answers
    RESOURCE_EXHAUSTED, 1..1000000."""
    max_streams_per_connection: int = bounded(256, 1, 100_000)
    """HTTP/2 streams (calls) one connection may have open; more wait on the client, 1..100000."""
    max_connections: int = bounded(1024, 1, 100_000)
    """Open client connections; more are refused, 1..100000."""
    keepalive_time_s: float = bounded(60.0, 1, 86_400)
    """The server pings a connection quiet for this long and drops it when no answer comes
    within `keepalive_timeout_s` (dead peers free their slots), 1..86400 s."""
    keepalive_timeout_s: float = bounded(20.0, 1, 3600)
    """How long a keepalive ping may go unanswered, 1..3600 s."""
    min_ping_interval_s: float = bounded(10.0, 1, 3600)
    """Clients pinging more often than this are sent GOAWAY (ping floods), 1..3600 s."""

    @property
    def metrics_bind_host(self) -> str:
        return self.metrics_host or self.host

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def __post_init__(self) -> None:
        check_bounds(self)
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
        if self.compile not in COMPILE_MODES:
            raise SettingsError(
                f"compile must be one of {', '.join(COMPILE_MODES)}, not {self.compile!r}"
            )
        if self.dtype not in DTYPES:
            raise SettingsError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise SettingsError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if not self.model.strip():
            raise SettingsError("model must not be empty")
        if self.device == "cpu" and self.dtype == "float16":
            raise SettingsError("dtype float16 needs a GPU; use float32 or bfloat16 on the CPU")

    def _check_security(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SettingsError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def bounds_of(name: str) -> tuple[float, float] | None:
    """The (low, high) bounds of a Settings field, or None for an unbounded one."""
    for f in dataclasses.fields(Settings):
        if f.name == name:
            return f.metadata.get("bounds")
    return None


def check_bounds(config: Any) -> None:
    """Check every field of a dataclass that shares its name with a bounded Settings field
    against those bounds: one rule per setting, wherever a config carries it."""
    for f in dataclasses.fields(config):
        bounds = bounds_of(f.name)
        if bounds is not None:
            _check_range(f.name, getattr(config, f.name), *bounds)


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/whisper-grpc`, or `~/.cache/whisper-grpc`: the one default, for the
    server and for `python -m server.checkpoints.provision`."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "whisper-grpc"


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SettingsError(f"{name} must be a number, not {value!r}")
    if not low <= value <= high:
        raise SettingsError(f"{name} must be between {low} and {high}, not {value}")
