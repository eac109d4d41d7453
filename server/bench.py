"""Benchmark: the gRPC server against in-process `model.generate`, same weights, same audio,
one run, so the ratios are measured side by side on the same (possibly noisy) machine.

    python -m server.bench --dataset DIR [--model tiny.en] [--concurrency 1,4,8]
    python -m server.bench study ...     the seed study (server.study)

For each level it prints throughput (files/s, audio seconds per second) and p50/p99 latency:
first the in-process references (plain transformers `generate` on batches of 1 and 8, with
feature extraction included), then the server through gRPC on loopback at each concurrency
(N client threads, each sending the next file when the last returns).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from asr.v1 import asr_pb2
from server.config import Settings
from server.embedded import EmbeddedServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Clip:
    name: str
    content: bytes  # the file as sent over gRPC
    samples: np.ndarray  # 16 kHz mono, for the in-process reference

    @property
    def duration_s(self) -> float:
        return len(self.samples) / 16_000


@dataclass(frozen=True)
class Row:
    name: str
    files: int
    wall_s: float
    audio_s: float
    latencies_s: list[float]
    batch_sizes: list[int]

    def cells(self) -> list[str]:
        lat = sorted(self.latencies_s)
        return [
            self.name,
            str(self.files),
            f"{self.files / self.wall_s:.2f}",
            f"{self.audio_s / self.wall_s:.1f}",
            f"{_percentile(lat, 50) * 1000:.0f}",
            f"{_percentile(lat, 99) * 1000:.0f}",
            f"{np.mean(self.batch_sizes):.1f}",
        ]


def _percentile(sorted_values: Sequence[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    return float(np.percentile(np.asarray(sorted_values), pct))


def load_clips(dataset: Path, min_s: float, max_s: float, limit: int) -> list[Clip]:
    clips = []
    for path in sorted(dataset.rglob("*.flac")) + sorted(dataset.rglob("*.wav")):
        info = sf.info(path)
        if min_s <= info.duration <= max_s:
            samples, rate = sf.read(path, dtype="float32")
            if rate != 16_000 or samples.ndim != 1:
                continue  # the reference path takes 16 kHz mono only; LibriSpeech is
            clips.append(Clip(path.stem, path.read_bytes(), samples))
        if len(clips) >= limit:
            break
    if not clips:
        raise SystemExit(f"no 16 kHz mono clips of {min_s}-{max_s} s under {dataset}")
    return clips


def bench_in_process(model: object, clips: list[Clip], batch: int, rounds: int) -> Row:
    """Plain transformers generate on batches of `batch`, feature extraction included."""
    import torch

    hf_model = model.model  # type: ignore[attr-defined]
    extractor = model.processor.feature_extractor  # type: ignore[attr-defined]
    work = clips * rounds
    latencies = []
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(work), batch):
            chunk = work[i : i + batch]
            t0 = time.perf_counter()
            features = extractor(
                [c.samples for c in chunk], sampling_rate=16_000, return_tensors="pt"
            ).input_features.to(hf_model.device, hf_model.dtype)
            hf_model.generate(features)
            latencies += [time.perf_counter() - t0] * len(chunk)
    wall = time.perf_counter() - started
    name = f"in-process generate, batch {batch}"
    return Row(name, len(work), wall, _audio(work), latencies, [batch])


def bench_grpc(server: EmbeddedServer, clips: list[Clip], concurrency: int, rounds: int) -> Row:
    stub = server.stub()
    work = clips * rounds
    latencies: list[float] = []
    batch_sizes: list[int] = []
    lock = threading.Lock()
    cursor = iter(range(len(work)))

    def client() -> None:
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            request = asr_pb2.RecognizeRequest(
                audio=asr_pb2.RecognitionAudio(content=work[i].content)
            )
            t0 = time.perf_counter()
            response = stub.Recognize(request, timeout=600)
            with lock:
                latencies.append(time.perf_counter() - t0)
                batch_sizes.append(response.timing.batch_size)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - started
    name = f"gRPC server, concurrency {concurrency}"
    return Row(name, len(work), wall, _audio(work), latencies, batch_sizes)


@dataclass(frozen=True)
class StreamRow:
    streams: int
    first_interim_s: list[float]  # from the first chunk sent to the first interim result
    final_s: list[float]  # from the last chunk sent to the last final result
    missing_interims: int

    def cells(self) -> list[str]:
        def ms(values: list[float], pct: float) -> str:
            return f"{_percentile(sorted(values), pct) * 1000:.0f}"

        return [
            f"{self.streams} stream(s), real time",
            ms(self.first_interim_s, 50),
            ms(self.first_interim_s, 99),
            ms(self.final_s, 50),
            ms(self.final_s, 99),
            f"{max(self.final_s) * 1000:.0f}",
            str(self.missing_interims),
        ]


def _stream_once(stub: object, clip: Clip) -> tuple[float | None, float]:
    """Stream one clip at real-time pace in 100 ms chunks; returns (first interim delay,
    finalization delay after the last chunk)."""
    config = asr_pb2.RecognitionConfig(
        encoding=asr_pb2.RecognitionConfig.LINEAR16, sample_rate_hertz=16_000
    )
    pcm = (np.clip(clip.samples, -1, 1) * 32767).astype("<i2").tobytes()
    marks: dict[str, float] = {}

    def requests():  # type: ignore[no-untyped-def]
        yield asr_pb2.StreamingRecognizeRequest(
            streaming_config=asr_pb2.StreamingRecognitionConfig(config=config, interim_results=True)
        )
        step = 3200  # 100 ms of 16-bit samples
        marks["start"] = time.monotonic()
        for i in range(0, len(pcm), step):
            time.sleep(max(0.0, marks["start"] + i / 32_000 - time.monotonic()))  # pacing
            yield asr_pb2.StreamingRecognizeRequest(audio_content=pcm[i : i + step])
        marks["end"] = time.monotonic()

    first_interim, last_final = None, 0.0
    for response in stub.StreamingRecognize(requests(), timeout=600):  # type: ignore[attr-defined]
        now = time.monotonic()
        for result in response.results:
            if not result.is_final and first_interim is None:
                first_interim = now - marks["start"]
            if result.is_final:
                last_final = now
    return first_interim, max(0.0, last_final - marks["end"])


def bench_streams(
    server: EmbeddedServer, clips: list[Clip], streams: int, per_stream: int = 1
) -> StreamRow:
    """`streams` concurrent clients, each streaming `per_stream` clips one after another."""
    stub = server.stub()

    def client(i: int) -> list[tuple[float | None, float]]:
        picks = [clips[(i + k * streams) % len(clips)] for k in range(per_stream)]
        return [_stream_once(stub, clip) for clip in picks]

    with ThreadPoolExecutor(streams) as pool:
        outcomes = [o for per_client in pool.map(client, range(streams)) for o in per_client]
    interims = [o[0] for o in outcomes if o[0] is not None]
    return StreamRow(streams, interims, [o[1] for o in outcomes], len(outcomes) - len(interims))


def print_stream_table(rows: list[StreamRow], out: Callable[[str], None] = print) -> None:
    header = ["", "first interim p50 ms", "p99 ms", "final after last chunk p50 ms",
              "p99 ms", "max ms", "utterances without interim"]  # fmt: skip
    out("| " + " | ".join(header) + " |")
    out("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in rows:
        out("| " + " | ".join(row.cells()) + " |")


def _audio(clips: list[Clip]) -> float:
    return sum(c.duration_s for c in clips)


def print_table(rows: list[Row], out: Callable[[str], None] = print) -> None:
    header = ["", "files", "files/s", "audio s/s", "p50 ms", "p99 ms", "mean batch"]
    out("| " + " | ".join(header) + " |")
    out("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in rows:
        out("| " + " | ".join(row.cells()) + " |")


def _ratio(a: Row, b: Row) -> float:
    return (a.files / a.wall_s) / (b.files / b.wall_s)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["study"]:  # the seed study: server/study.py
        from server.study import main as study

        return study(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m server.bench", description=__doc__)
    parser.add_argument("--dataset", type=Path, required=True, help="folder of FLAC/WAV files")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", default="1,4,8", help="unary levels ('' for none)")
    parser.add_argument("--streams", default="1,4,8", help="real-time stream levels ('' for none)")
    parser.add_argument("--clips-per-stream", type=int, default=3, help="clips each stream sends")
    parser.add_argument("--engine", default="continuous", help="the server's --engine")
    parser.add_argument("--max-active", type=int, default=16, help="the server's --max-active")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--min-s", type=float, default=8.0, help="shortest clip used, s")
    parser.add_argument("--max-s", type=float, default=10.0, help="longest clip used, s")
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="passes over the files per level")
    parser.add_argument("--cache-dir", type=Path, default=Settings().cache_dir)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    stream_levels = [int(c) for c in args.streams.split(",") if c]

    from server.models.loader import load_model

    settings = Settings(
        model=args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        max_queue_size=max(256, args.max_batch_size), metrics_port=-1, engine=args.engine,
        max_active=args.max_active,
    )  # fmt: skip
    clips = load_clips(args.dataset, args.min_s, args.max_s, args.files)
    print(
        f"{len(clips)} clips, {_audio(clips):.0f} s of audio, {args.rounds} round(s); "
        f"model {args.model}, {args.engine} engine, max batch {args.max_batch_size}, "
        f"max wait {args.max_wait_ms} ms",
        file=sys.stderr,
    )
    model = load_model(settings)
    rows = [bench_in_process(model, clips, b, args.rounds) for b in (1, args.max_batch_size)]
    server = EmbeddedServer(settings, model).start()
    try:
        rows += [bench_grpc(server, clips, c, args.rounds) for c in levels]
        stream_rows = [
            bench_streams(server, clips, n, args.clips_per_stream) for n in stream_levels
        ]
    finally:
        server.stop()
    print_table(rows)
    if stream_rows:
        print()
        print_stream_table(stream_rows)
    by_name = {r.name: r for r in rows}
    top = by_name.get(f"gRPC server, concurrency {max(levels, default=0)}")
    one = by_name.get("gRPC server, concurrency 1")
    if top is not None:
        print(f"\nserver c{max(levels)} / in-process batch {args.max_batch_size}: "
              f"{_ratio(top, rows[1]):.2f}")  # fmt: skip
        if one is not None:
            print(f"server c{max(levels)} / server c1: {_ratio(top, one):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
