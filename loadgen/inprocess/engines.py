"""`python -m loadgen engines`: continuous (iteration-level) batching against generate-based
micro-batching and in-process `generate`, side by side: same weights, same files, one process,
one run, so the ratios hold on a noisy shared machine.

    python -m loadgen engines [--dataset sample] [--files 100] [--concurrency 1,4,8,16]
        [--max-active 16] [--max-batch-size 8]

Configurations: in-process references, transformers `generate` on batches of 1 and of
--max-batch-size with feature extraction included (a file's latency is its batch's time); and
for each concurrency c, a real gRPC server on loopback with `--engine generate` and one with
`--engine continuous`, speech gates off, driven by c asyncio gRPC clients that each send the
next file when the last one returns. At concurrency 1 the configurations take turns file by
file; at higher levels block by block, so the load of other processes falls on all of them
alike. Then the ratios of the targets, and the transcripts of every configuration against
in-process batch-1 generate (identical files) and against the references (WER).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loadgen.dataset import DEFAULT_DATASET, Clip, load_clips
from loadgen.inprocess.measure import InProcess, Row, Served, served_settings, table, take_turns
from loadgen.wer import word_error_rate


def engine(kind: str, model: Any, concurrency: int, args: argparse.Namespace) -> Served:
    settings = served_settings(
        engine=kind, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_prepare_wait_ms=args.max_prepare_wait_ms, max_active=args.max_active,
        max_join_share=args.max_join_share,
    )  # fmt: skip
    return Served(settings, model, concurrency)


async def run_all(model: Any, clips: list[Clip], args: argparse.Namespace) -> list[Row]:
    kinds = args.engines.split(",")
    levels = [int(c) for c in args.concurrency.split(",") if c]
    every = list(range(len(clips)))
    rows: list[Row] = []
    for c in levels:
        configs: list[InProcess | Served] = [engine(kind, model, c, args) for kind in kinds]
        if c in (1, args.max_batch_size):
            configs.insert(0, InProcess(model, c))
        try:
            await take_turns(configs, clips, every, 1 if c == 1 else args.block)
        finally:
            for config in configs:
                if isinstance(config, Served):
                    config.close()
        rows += [config.row for config in configs]
        progress(table(rows[-len(configs) :]))
    return rows


def progress(text: str) -> None:
    """Each level's rows as soon as it is done, on stderr: a long run killed half-way still
    leaves its numbers."""
    print(text, file=sys.stderr, flush=True)


def transcripts(rows: list[Row], clips: list[Clip]) -> str:
    base = next((r for r in rows if r.name == "in-process generate, batch 1"), rows[0])
    refs = [c.reference or "" for c in clips]
    lines = [f"| transcripts | same as {base.name} | WER vs references |", "|---|---:|---:|"]
    for row in rows:
        texts = [row.texts[i] for i in range(len(clips))]
        same = sum(row.texts[i] == base.texts[i] for i in range(len(clips)))
        wer = word_error_rate(refs, texts)
        lines.append(f"| {row.name} | {same}/{len(clips)} ({same / len(clips):.1%}) | {wer:.2%} |")
    return "\n".join(lines)


def targets(rows: list[Row], max_batch: int, out: Callable[[str], None]) -> None:
    by = {r.name: r for r in rows}
    one = by.get("in-process generate, batch 1")
    big = by.get(f"in-process generate, batch {max_batch}")
    c8, g8 = by.get("continuous engine, concurrency 8"), by.get("generate engine, concurrency 8")
    c1 = by.get("continuous engine, concurrency 1")
    out("\ntargets:")
    if c8 and big:
        out(f"  throughput, continuous c8 / in-process generate batch {max_batch}: "
            f"{c8.files_per_s / big.files_per_s:.2f} (target >= 1.15)")  # fmt: skip
    if c8 and g8:
        out(f"  p50 at c8: continuous {c8.p_ms(50):.0f} ms, generate engine "
            f"{g8.p_ms(50):.0f} ms (target: lower)")  # fmt: skip
    if c1 and one:
        out(f"  p50 at c1, continuous / in-process batch-1 generate: "
            f"{c1.p_ms(50) / one.p_ms(50):.2f} (target <= 1.10)")  # fmt: skip
    for row in rows:
        other = by.get(row.name.replace("continuous", "generate"))
        if row.name.startswith("continuous") and other is not None:
            out(f"  {row.name}: throughput x{row.files_per_s / other.files_per_s:.2f}, "
                f"p50 x{row.p_ms(50) / other.p_ms(50):.2f} of the generate engine")  # fmt: skip


def load_whisper(args: argparse.Namespace) -> Any:
    """The model as the server loads it, without warm-up (each runner warms its shapes)."""
    from server.models.loader import load_model

    settings = served_settings(
        model=args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir,
        num_threads=args.threads, max_new_tokens=args.max_new_tokens,
    )  # fmt: skip
    return load_model(settings)


def build_parser() -> argparse.ArgumentParser:
    from server.config import default_cache_dir

    parser = argparse.ArgumentParser(
        prog="python -m loadgen engines", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="data set spec [sample]")
    parser.add_argument("--files", type=int, default=100, help="files measured [100]")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--dtype", default="auto", help="auto: fp16 on GPU, fp32 on CPU")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--engines", default="generate,continuous")
    parser.add_argument(
        "--max-batch-size", type=int, default=8,
        help="generate engine batch, continuous encoder batch, in-process reference",
    )  # fmt: skip
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="generate engine")
    parser.add_argument("--max-prepare-wait-ms", type=float, default=100.0, help="generate engine")
    parser.add_argument("--max-active", type=int, default=16, help="continuous engine")
    parser.add_argument("--max-join-share", type=float, default=1.0, help="continuous engine")
    parser.add_argument("--block", type=int, default=50, help="files per block (see run_all)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--max-new-tokens", type=int, default=440,
                        help="longest transcript per 30 s window, tokens [440]")  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model = load_whisper(args)
    clips = load_clips(args.dataset, files=args.files)
    lengths = [c.duration_s for c in clips]
    print(f"{len(clips)} files of {args.dataset}, {sum(lengths):.0f} s of audio "
          f"({min(lengths):.1f}-{max(lengths):.1f} s); {args.model}, {args.threads} threads",
          file=sys.stderr)  # fmt: skip
    rows = asyncio.run(run_all(model, clips, args))
    print(table(rows))
    print()
    print(transcripts(rows, clips))
    targets(rows, args.max_batch_size, print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
