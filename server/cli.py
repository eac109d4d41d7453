"""Command line and environment -> Settings, then `server.app.run`. Nothing else.

Every flag can also be set by an environment variable `WHISPER_GRPC_<FLAG>` (dashes become
underscores: `--max-batch-size` <- `WHISPER_GRPC_MAX_BATCH_SIZE`); a flag beats the variable.
Invalid values end the process with a message and exit code 2 before anything loads.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from server.config import Settings, SettingsError
from server.memory import tune_malloc
from server.openmp import tune_openmp

ENV_PREFIX = "WHISPER_GRPC_"

# flag -> (type, help). Defaults and bounds live in Settings; the help repeats its doc.
_FLAGS: dict[str, tuple[Any, str]] = {
    "host": (str, "address to listen on"),
    "port": (int, "gRPC port (0: any free port)"),
    "model": (str, "built-in name (tiny.en, base), local checkpoint dir, or hub id"),
    "device": (str, "auto, cpu, cuda, cuda:N"),
    "dtype": (
        str,
        "auto (fp16 on GPU, bf16 on CPUs with native bf16, else fp32), float32, float16, bfloat16",
    ),
    "engine": (str, "continuous (decoder steps shared by all windows in flight) or generate"),
    "max-batch-size": (int, "most 30 s windows per model call (continuous: per encoder pass)"),
    "compile": (str, "continuous engine: decode step auto (compiled / CUDA graphs), on, off"),
    "max-active": (int, "continuous engine: most windows decoding at once"),
    "max-join-share": (float, "continuous engine: tail guard, (0, 1]; 1: off"),
    "max-fallback-share": (float, "continuous engine: most worker time a fallback takes, (0, 1]"),
    "max-wait-ms": (float, "longest a batch waits to fill after its first item, ms"),
    "max-prepare-wait-ms": (float, "longest a batch waits for requests still being decoded, ms"),
    "max-queue-size": (int, "windows allowed to wait; beyond: RESOURCE_EXHAUSTED"),
    "max-audio-s": (float, "longest audio accepted per request, seconds"),
    "max-message-mb": (float, "largest gRPC message accepted, MiB"),
    "metrics-port": (int, "Prometheus port (-1: off, 0: any free port)"),
    "log-level": (str, "DEBUG, INFO, WARNING, ERROR"),
    "cache-dir": (Path, "where built-in models are converted once"),
    "num-threads": (int, "torch CPU threads (0: all cores)"),
    "grace-s": (float, "on SIGTERM, time allowed for queued work to finish, seconds"),
    "max-connection-age-s": (float, "GOAWAY each connection after about this long (0: off), s"),
    "max-connection-age-grace-s": (float, "then, time for its calls in flight to finish, s"),
    "warmup": (lambda v: _parse_bool(v), "warm the model up before SERVING (true/false)"),
    "max-new-tokens": (int, "decoder token limit per 30 s window"),
    "max-beam-size": (int, "largest beam a client may ask for"),
    "no-speech-threshold": (float, "no-speech probability above which a window gives no text"),
    "silence-dbfs": (float, "windows quieter than this are not decoded, dBFS"),
    "max-streams": (int, "concurrent streams; beyond: RESOURCE_EXHAUSTED"),
    "max-stream-s": (float, "longest audio per stream, seconds"),
    "stream-buffer-s": (float, "audio a stream may send ahead of recognition, seconds"),
    "stream-idle-timeout-s": (float, "a stream silent on the wire this long ends, seconds"),
    "endpoint-silence-ms": (int, "default silence after speech that ends an utterance, ms"),
    "interim-interval-ms": (int, "default new audio between interim re-decodes, ms"),
    "malloc-mmap-threshold-kb": (int, "glibc: blocks this large are unmapped when freed (0: auto)"),
    "malloc-arena-max": (int, "glibc: most malloc arenas (0: glibc's default)"),
    "malloc-trim-s": (float, "return freed heap memory to the OS every this many s (0: never)"),
    # security and connection limits
    "metrics-host": (str, "address of the metrics endpoint (empty: --host)"),
    "tls-cert": (lambda v: _optional_path(v), "PEM certificate chain: serve TLS (with --tls-key)"),
    "tls-key": (lambda v: _optional_path(v), "PEM private key of --tls-cert"),
    "tls-client-ca": (
        lambda v: _optional_path(v),
        "PEM CA bundle: require client certificates it signed (mTLS)",
    ),
    "auth-token-file": (
        lambda v: _optional_path(v),
        "bearer tokens, one per line: asr.v1 calls need one",
    ),
    "max-calls-per-client": (int, "concurrent calls per client (token or address); 0: no cap"),
    "max-streams-per-client": (int, "concurrent streams per client; 0: no cap"),
    "max-concurrent-rpcs": (int, "calls in progress on the whole server"),
    "max-streams-per-connection": (int, "HTTP/2 streams open per connection"),
    "max-connections": (int, "open client connections"),
    "keepalive-time-s": (float, "ping a connection quiet this long, seconds"),
    "keepalive-timeout-s": (float, "drop a connection whose ping goes unanswered this long"),
    "min-ping-interval-s": (float, "GOAWAY to clients pinging more often, seconds"),
}


def _optional_path(value: str) -> Path | None:
    """An empty value (`WHISPER_GRPC_TLS_CERT=` in a compose file) means unset."""
    return Path(value) if value.strip() else None


def _parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Flags over environment over defaults. Raises SettingsError naming the bad setting."""
    env = os.environ if env is None else env
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="whisper-grpc-server", description=__doc__)
    for flag, (_type, help_text) in _FLAGS.items():
        name = flag.replace("-", "_")
        parser.add_argument(
            f"--{flag}",
            dest=name,
            default=None,
            help=f"{help_text} [env {ENV_PREFIX}{name.upper()}; default {getattr(defaults, name)}]",
        )
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for flag, (convert, _help) in _FLAGS.items():
        name = flag.replace("-", "_")
        raw = getattr(args, name)
        source = f"--{flag}"
        if raw is None and f"{ENV_PREFIX}{name.upper()}" in env:
            raw, source = env[f"{ENV_PREFIX}{name.upper()}"], f"{ENV_PREFIX}{name.upper()}"
        if raw is None:
            continue
        try:
            values[name] = convert(raw)
        except ValueError as err:
            raise SettingsError(f"{source}: invalid value {raw!r} ({err})") from err
    values["log_level"] = str(values.get("log_level", defaults.log_level)).upper()
    return dataclasses.replace(defaults, **values)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except SettingsError as err:
        print(f"whisper-grpc-server: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Before any thread starts (gRPC, torch): arenas are made per thread on first use.
    tune_malloc(settings.malloc_mmap_threshold_kb, settings.malloc_arena_max)
    # Before torch loads libgomp, which reads its environment once (server.openmp).
    logging.getLogger(__name__).info(tune_openmp())
    return asyncio.run(_run(settings))


async def _run(settings: Settings) -> int:
    from server.app import run

    return await run(settings)


if __name__ == "__main__":
    sys.exit(main())
