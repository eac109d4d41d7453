"""`python -m loadgen precision`: float32 against bfloat16 on this machine, side by side: same
files, one process, one run, the two taking turns block by block, so the ratio holds on a
noisy machine.

    python -m loadgen precision [--dataset sample] [--files 100] [--concurrency 8]
        [--streams 1,4] [--dtypes float32,bfloat16]

Unary: a real gRPC server per dtype (continuous engine, speech gates off) on loopback, driven
by `--concurrency` clients that each send the next file when the last returns: files/s, audio
s/s, p50/p99, WER. Streams: real-time streams (100 ms chunks, interim results, 3 clips of 8-10 s
each per stream) at each `--streams` level against a server per dtype with its default
settings: first interim and finalization latency. Also prints what `--dtype auto` would pick
here, and why.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadgen.dataset import DEFAULT_DATASET, Clip, load_clips
from loadgen.inprocess.measure import (
    Row,
    Served,
    StreamRow,
    served_settings,
    stream_row,
    stream_table,
    table,
    take_turns,
)
from loadgen.wer import word_error_rate
from server.config import Settings
from server.embedded import EmbeddedServer


async def unary(models: dict[str, Any], clips: list[Clip], args: argparse.Namespace) -> list[Row]:
    settings = served_settings(
        engine="continuous", max_batch_size=args.max_batch_size, max_active=args.max_active
    )
    configs = [
        Served(settings.replace(dtype=d), m, args.concurrency,
               name=f"continuous engine, concurrency {args.concurrency}, {d}")
        for d, m in models.items()
    ]  # fmt: skip
    try:
        await take_turns(configs, clips, list(range(len(clips))), args.block)
    finally:
        for config in configs:
            config.close()
    refs = [c.reference or "" for c in clips]
    for config in configs:
        texts = [config.row.texts[i] for i in range(len(clips))]
        config.row.note = f"WER {word_error_rate(refs, texts):.2%}; {config.row.note}"
    return [c.row for c in configs]


def streams(models: dict[str, Any], args: argparse.Namespace) -> dict[str, list[StreamRow]]:
    clips = load_clips(args.dataset, files=16, min_s=args.stream_min_s, max_s=args.stream_max_s)
    levels = [int(n) for n in args.streams.split(",") if n]
    rows: dict[str, list[StreamRow]] = {d: [] for d in models}
    settings = Settings(warmup=False, metrics_port=-1, max_new_tokens=args.max_new_tokens)
    servers = {d: EmbeddedServer(settings.replace(dtype=d), m).start() for d, m in models.items()}
    try:
        for n in levels:
            for d in models:  # the dtypes take turns level by level
                rows[d].append(stream_row(servers[d], clips, n, args.clips_per_stream))
    finally:
        for server in servers.values():
            server.stop()
    return rows


def build_parser() -> argparse.ArgumentParser:
    from server.config import default_cache_dir

    parser = argparse.ArgumentParser(
        prog="python -m loadgen precision", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="data set spec [sample]")
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--streams", default="1,4", help="real-time stream levels ('' for none)")
    parser.add_argument("--stream-min-s", type=float, default=8.0, help="shortest streamed clip")
    parser.add_argument("--stream-max-s", type=float, default=10.0, help="longest streamed clip")
    parser.add_argument("--clips-per-stream", type=int, default=3, help="one after another [3]")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-active", type=int, default=16)
    parser.add_argument("--block", type=int, default=25)
    parser.add_argument("--max-new-tokens", type=int, default=440,
                        help="longest transcript per 30 s window, tokens [440]")  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from server.models.device import choose_dtype, cpu_bf16_support, resolve_device
    from server.models.loader import load_model

    auto = choose_dtype("auto", resolve_device("cpu"), cpu_bf16_support())
    print(f"--dtype auto here: {auto.name} ({auto.reason})")
    base = Settings(
        model=args.model, device="cpu", warmup=True, cache_dir=args.cache_dir,
        max_batch_size=args.max_batch_size, max_new_tokens=args.max_new_tokens,
    )  # fmt: skip
    models = {d: load_model(base.replace(dtype=d)) for d in args.dtypes.split(",")}
    clips = load_clips(args.dataset, files=args.files)
    rows = asyncio.run(unary(models, clips, args))
    print(f"\nunary, {len(clips)} files of {args.dataset}, concurrency {args.concurrency}:")
    print(table(rows))
    first, *others = rows
    for row in others:
        print(f"{row.name}: throughput x{row.files_per_s / first.files_per_s:.2f} of {first.name}")
    if args.streams:
        for d, per_level in streams(models, args).items():
            print(f"\nreal-time streams, {d}:")
            print(stream_table(per_level))
    return 0


if __name__ == "__main__":
    sys.exit(main())
