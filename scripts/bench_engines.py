"""Continuous (iteration-level) batching against generate-based micro-batching, side by side:
same weights, same files, one process, one run, so the ratios hold on a noisy shared machine.

    .venv/bin/python scripts/bench_engines.py [--dataset DIR] [--split test-other] [--files 100]
        [--concurrency 1,4,8,16] [--max-active 16] [--max-batch-size 8]

Configurations: in-process references, transformers `generate` on batches of 1 and of
--max-batch-size with feature extraction included (as `server.bench`; a file's latency is its
batch's time); and for each concurrency c, a real gRPC server on loopback with
`--engine generate` (MicroBatcher + WhisperModel.run_batch) and one with `--engine continuous`
(server.batching.continuous), speech gates off, driven by c asyncio gRPC clients that each send
the next FLAC file when the last one returns. At concurrency 1 the configurations take turns
file by file; at higher levels block by block (`run_all`), so the load of other processes on a
shared machine falls on all of them alike. Then the ratios of the targets, and the transcripts of
every configuration against in-process batch-1 generate (identical files) and against the
LibriSpeech references (WER).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from asr.v1 import asr_pb2, asr_pb2_grpc  # noqa: E402
from server.config import Settings  # noqa: E402
from server.embedded import EmbeddedServer  # noqa: E402
from server.evaluation import word_error_rate  # noqa: E402

LIBRISPEECH = ROOT.parent / "shared" / "data" / "LibriSpeech"  # the default --dataset
CHANNEL = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


@dataclass(frozen=True)
class Clip:
    uid: str
    content: bytes  # the FLAC file, as a client sends it
    samples: np.ndarray  # 16 kHz mono, for the in-process references
    reference: str

    @property
    def duration_s(self) -> float:
        return len(self.samples) / 16_000


@dataclass
class Row:
    """One configuration's measurements, accumulated over the blocks it ran in."""

    name: str
    wall_s: float = 0.0
    audio_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)  # clip index -> transcript
    note: str = ""

    @property
    def files_per_s(self) -> float:
        return len(self.texts) / self.wall_s

    @property
    def p50_s(self) -> float:
        return float(np.percentile(self.latencies_s, 50))

    def cells(self) -> list[str]:
        return [
            self.name,
            str(len(self.texts)),
            f"{self.files_per_s:.2f}",
            f"{self.audio_s / self.wall_s:.1f}",
            f"{self.p50_s * 1000:.0f}",
            f"{np.percentile(self.latencies_s, 99) * 1000:.0f}",
            self.note,
        ]


def load_clips(dataset: Path, split: str, limit: int) -> list[Clip]:
    clips: list[Clip] = []
    for trans in sorted((dataset / split).rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            uid, _, text = line.partition(" ")
            path = trans.parent / f"{uid}.flac"
            if path.exists() and len(clips) < limit:
                samples, rate = sf.read(path, dtype="float32")
                assert rate == 16_000 and samples.ndim == 1, path
                clips.append(Clip(uid, path.read_bytes(), samples, text))
    if not clips:
        raise SystemExit(f"no LibriSpeech files under {dataset / split}")
    return clips


def load_clips_from(folder: Path) -> list[Clip]:
    """FLAC files of a folder with a transcripts.txt ("<id> <text>" lines), e.g. the GPU pack's."""
    clips = []
    for line in (folder / "transcripts.txt").read_text().splitlines():
        uid, _, text = line.partition(" ")
        path = folder / f"{uid}.flac"
        samples, rate = sf.read(path, dtype="float32")
        assert rate == 16_000 and samples.ndim == 1, path
        clips.append(Clip(uid, path.read_bytes(), samples, text))
    return clips


# -- the configurations ---------------------------------------------------------------------
class InProcess:
    """Plain transformers `generate` on batches of `batch`, feature extraction included; a
    file's latency is its batch's time."""

    def __init__(self, model: Any, batch: int) -> None:
        self.model, self.batch = model, batch
        self.row = Row(f"in-process generate, batch {batch}")

    async def run(self, clips: list[Clip], indices: list[int]) -> None:
        import torch

        model, row = self.model, self.row
        hf, extractor = model.model, model.processor.feature_extractor
        started = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(indices), self.batch):
                chunk = indices[i : i + self.batch]
                t0 = time.perf_counter()
                features = extractor(
                    [clips[j].samples for j in chunk], sampling_rate=16_000, return_tensors="pt"
                ).input_features.to(hf.device, hf.dtype)
                out = hf.generate(features, max_new_tokens=model.max_new_tokens)
                texts = model.tokenizer.batch_decode(out, skip_special_tokens=True)
                row.texts.update({j: t.strip() for j, t in zip(chunk, texts, strict=True)})
                row.latencies_s += [time.perf_counter() - t0] * len(chunk)
        row.wall_s += time.perf_counter() - started
        row.audio_s += sum(clips[j].duration_s for j in indices)


class Engine:
    """A real gRPC server on loopback (`server.embedded`) with this engine and its own model
    worker thread, speech gates off, driven by `concurrency` asyncio clients that each send the
    next file (the FLAC bytes, as any client would) when the last one returns."""

    def __init__(self, kind: str, model: Any, concurrency: int, args: argparse.Namespace) -> None:
        self.kind, self.concurrency = kind, concurrency
        settings = Settings(
            engine=kind, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
            max_prepare_wait_ms=args.max_prepare_wait_ms, max_active=args.max_active,
            max_join_share=args.max_join_share,
            max_queue_size=1024, no_speech_threshold=1.0, silence_dbfs=-200.0, warmup=False,
        )  # fmt: skip
        self.server = EmbeddedServer(settings, model).start()
        self.row = Row(f"{kind} engine, concurrency {concurrency}")
        self.warm = False

    async def run(self, clips: list[Clip], indices: list[int]) -> None:
        cursor = iter(indices)
        row = self.row
        async with grpc.aio.insecure_channel(self.server.address, options=CHANNEL) as channel:
            stub = asr_pb2_grpc.SpeechStub(channel)

            async def transcribe(clip: Clip) -> str:
                audio = asr_pb2.RecognitionAudio(content=clip.content)
                response = await stub.Recognize(asr_pb2.RecognizeRequest(audio=audio))
                return " ".join(r.alternatives[0].transcript for r in response.results)

            if not self.warm:  # first-call allocations, not timed
                await transcribe(clips[0])
                self.warm = True

            async def client() -> None:
                while (i := next(cursor, None)) is not None:
                    t0 = time.perf_counter()
                    text = await transcribe(clips[i])
                    row.latencies_s.append(time.perf_counter() - t0)
                    row.texts[i] = text

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(self.concurrency)))
            row.wall_s += time.perf_counter() - started
        row.audio_s += sum(clips[j].duration_s for j in indices)

    async def close(self) -> None:
        batcher = self.server.handle.batcher if self.server.handle else None
        stats = getattr(batcher, "stats", None)
        if stats is not None:
            s = stats()
            self.row.note = (
                f"mean decode batch {s.step_rows / max(1, s.decode_steps):.1f}, "
                f"{s.encoder_windows / max(1, s.encoder_batches):.1f} windows per encoder "
                f"call; encode {s.join_s:.0f} s, decode {s.decode_s:.0f} s"
            )
        self.server.stop()


async def run_all(model: Any, clips: list[Clip], args: argparse.Namespace) -> list[Row]:
    """Concurrency 1: file by file, each configuration in turn on the same file. Higher
    levels: blocks of files, each configuration in turn on the same block, the order rotated
    from block to block, so that the load of other processes falls on all of them alike."""
    kinds = args.engines.split(",")
    levels = [int(c) for c in args.concurrency.split(",") if c]
    every = list(range(len(clips)))
    rows: list[Row] = []
    await InProcess(model, 2).run(clips, every[:2])  # warm-up
    if 1 in levels:
        configs: list[InProcess | Engine] = [InProcess(model, 1)]
        configs += [Engine(kind, model, 1, args) for kind in kinds]
        for i in every:
            for config in configs[i % len(configs) :] + configs[: i % len(configs)]:
                await config.run(clips, [i])
        rows += await _finish(configs)
        print_table(rows[-len(configs) :], progress)
    for c in (c for c in levels if c > 1):
        configs = [Engine(kind, model, c, args) for kind in kinds]
        if c == args.max_batch_size:
            configs.insert(0, InProcess(model, args.max_batch_size))
        blocks = [every[i : i + args.block] for i in range(0, len(every), args.block)]
        for b, block in enumerate(blocks):
            for config in configs[b % len(configs) :] + configs[: b % len(configs)]:
                await config.run(clips, block)
        rows += await _finish(configs)
        print_table(rows[-len(configs) :], progress)
    return rows


def progress(line: str) -> None:
    """Each level's rows as soon as it is done, on stderr: a long run killed half-way still
    leaves its numbers."""
    print(line, file=sys.stderr, flush=True)


async def _finish(configs: Sequence[InProcess | Engine]) -> list[Row]:
    for config in configs:
        if isinstance(config, Engine):
            await config.close()
    return [config.row for config in configs]


# -- report ---------------------------------------------------------------------------------
def print_table(rows: list[Row], out: Callable[[str], None] = print) -> None:
    header = ["", "files", "files/s", "audio s/s", "p50 ms", "p99 ms", ""]
    out("| " + " | ".join(header) + " |")
    out("|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|")
    for row in rows:
        out("| " + " | ".join(row.cells()) + " |")


def print_transcripts(rows: list[Row], clips: list[Clip], out: Callable[[str], None]) -> None:
    base = next((r for r in rows if r.name == "in-process generate, batch 1"), rows[0])
    refs = [c.reference for c in clips]
    out(f"\n| transcripts | same as {base.name} | WER vs LibriSpeech |")
    out("|---|---:|---:|")
    for row in rows:
        texts = [row.texts[i] for i in range(len(clips))]
        same = sum(row.texts[i] == base.texts[i] for i in range(len(clips)))
        wer = word_error_rate(refs, texts)
        out(f"| {row.name} | {same}/{len(clips)} ({same / len(clips):.1%}) | {wer:.2%} |")


def print_targets(rows: list[Row], args: argparse.Namespace, out: Callable[[str], None]) -> None:
    by = {r.name: r for r in rows}
    one = by.get("in-process generate, batch 1")
    big = by.get(f"in-process generate, batch {args.max_batch_size}")
    c8, g8 = by.get("continuous engine, concurrency 8"), by.get("generate engine, concurrency 8")
    c1 = by.get("continuous engine, concurrency 1")
    out("\ntargets:")
    if c8 and big:
        out(f"  throughput, continuous c8 / in-process generate batch {args.max_batch_size}: "
            f"{c8.files_per_s / big.files_per_s:.2f} (target >= 1.15)")  # fmt: skip
    if c8 and g8:
        out(f"  p50 at c8: continuous {c8.p50_s * 1000:.0f} ms, generate engine "
            f"{g8.p50_s * 1000:.0f} ms (target: lower)")  # fmt: skip
    if c1 and one:
        out(f"  p50 at c1, continuous / in-process batch-1 generate: "
            f"{c1.p50_s / one.p50_s:.2f} (target <= 1.10)")  # fmt: skip
    for row in rows:
        other = by.get(row.name.replace("continuous", "generate"))
        if row.name.startswith("continuous") and other is not None:
            out(f"  {row.name}: throughput x{row.files_per_s / other.files_per_s:.2f}, "
                f"p50 x{row.p50_s / other.p50_s:.2f} of the generate engine")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--dataset", type=Path, default=LIBRISPEECH, help="LibriSpeech root (official layout)"
    )
    parser.add_argument("--split", default="test-other", help="LibriSpeech split under --dataset")
    parser.add_argument("--files", type=int, default=100)
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch
    import transformers

    from server.checkpoints.provision import resolve_model
    from server.models.whisper import WhisperModel

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    resolved = resolve_model(args.model, Path.home() / ".cache" / "whisper-grpc")
    model = WhisperModel(resolved.name_or_path, args.model, device=args.device, dtype=args.dtype)
    clips = load_clips(args.dataset, args.split, args.files)
    lengths = [c.duration_s for c in clips]
    print(f"{len(clips)} files of {args.split}, {sum(lengths):.0f} s of audio "
          f"({min(lengths):.1f}-{max(lengths):.1f} s); {args.model}, {args.threads} threads",
          file=sys.stderr)  # fmt: skip

    rows = asyncio.run(run_all(model, clips, args))
    print_table(rows)
    print_transcripts(rows, clips, print)
    print_targets(rows, args, print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
