"""float32 against bfloat16 on this machine, side by side: same files, one process, one run,
the two taking turns block by block, so the ratio holds on a noisy machine.

    .venv/bin/python scripts/bench_precision.py [--dataset DIR] [--files 100] [--concurrency 8]
        [--streams 1,4] [--dtypes float32,bfloat16]

Unary: a real gRPC server per dtype (continuous engine, speech gates off) on loopback, driven
by `--concurrency` clients that each send the next FLAC file of LibriSpeech test-other when the
last returns: files/s, audio s/s, p50/p99, WER. Streams: real-time streams (100 ms chunks,
interim results, 3 clips of 8-10 s each) at each `--streams` level against a server per dtype
with its default settings: first interim and finalization latency (as `server.bench`).
Also prints what `--dtype auto` would pick here, and why.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_engines import LIBRISPEECH, Engine, load_clips, print_table  # noqa: E402

from server import bench as stream_bench  # noqa: E402
from server.config import Settings  # noqa: E402
from server.embedded import EmbeddedServer  # noqa: E402
from server.evaluation import word_error_rate  # noqa: E402


async def unary(models: dict[str, Any], clips: list[Any], args: argparse.Namespace) -> list[Any]:
    engine_args = argparse.Namespace(
        max_batch_size=args.max_batch_size, max_wait_ms=10.0, max_prepare_wait_ms=100.0,
        max_active=args.max_active, max_join_share=1.0,
    )  # fmt: skip
    configs = {d: Engine("continuous", m, args.concurrency, engine_args) for d, m in models.items()}
    for dtype, config in configs.items():
        config.row.name = f"{config.row.name}, {dtype}"
    every = list(range(len(clips)))
    blocks = [every[i : i + args.block] for i in range(0, len(every), args.block)]
    order = list(configs.values())
    for b, block in enumerate(blocks):
        for config in order[b % len(order) :] + order[: b % len(order)]:
            await config.run(clips, block)
    for config in order:
        await config.close()
    refs = [c.reference for c in clips]
    for config in order:
        texts = [config.row.texts[i] for i in every]
        config.row.note = f"WER {word_error_rate(refs, texts):.2%}; {config.row.note}"
    return [c.row for c in order]


def streams(models: dict[str, Any], args: argparse.Namespace) -> dict[str, list[Any]]:
    clips = stream_bench.load_clips(args.dataset / args.split, 8.0, 10.0, 16)
    levels = [int(n) for n in args.streams.split(",") if n]
    rows: dict[str, list[Any]] = {d: [] for d in models}
    servers = {
        d: EmbeddedServer(Settings(dtype=d, warmup=False), m).start() for d, m in models.items()
    }
    try:
        for n in levels:
            for d in models:  # the dtypes take turns level by level
                rows[d].append(stream_bench.bench_streams(servers[d], clips, n, 3))
    finally:
        for server in servers.values():
            server.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--dataset", type=Path, default=LIBRISPEECH)
    parser.add_argument("--split", default="test-other")
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-active", type=int, default=16)
    parser.add_argument("--block", type=int, default=25)
    args = parser.parse_args(argv)

    import transformers

    from server.models.device import choose_dtype, cpu_bf16_support, resolve_device
    from server.models.loader import load_model

    transformers.logging.set_verbosity_error()
    auto = choose_dtype("auto", resolve_device("cpu"), cpu_bf16_support())
    print(f"--dtype auto here: {auto.name} ({auto.reason})")
    base = Settings(device="cpu", warmup=True, max_batch_size=args.max_batch_size)
    models = {d: load_model(base.replace(dtype=d)) for d in args.dtypes.split(",")}
    clips = load_clips(args.dataset, args.split, args.files)
    rows = asyncio.run(unary(models, clips, args))
    print(f"\nunary, {len(clips)} files of {args.split}, concurrency {args.concurrency}:")
    print_table(rows)
    first, *others = rows
    for row in others:
        print(f"{row.name}: throughput x{row.files_per_s / first.files_per_s:.2f} of {first.name}")
    stream_rows = streams(models, args)
    for d, per_level in stream_rows.items():
        print(f"\nreal-time streams, {d}:")
        stream_bench.print_stream_table(per_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
