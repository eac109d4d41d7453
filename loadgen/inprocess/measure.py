"""What every in-process measurement is made of: one `Row` of results, `InProcess` (plain
transformers `generate` on batches, feature extraction included), `Served` (a real gRPC server
on loopback with its own engine and model worker thread, driven by N asyncio clients, each
sending the next file when the last returns) and `stream_row` (real-time streams).

Each runner warms the shapes it will time before timing them: the first call of a shape pays
for kernel selection and allocator growth (oneDNN creates its bfloat16 kernels per shape),
which is start-up, not throughput. `run` may be called several times (blocks of files taking
turns with other configurations); the row accumulates.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc

from asr.v1 import asr_pb2, asr_pb2_grpc
from loadgen.dataset import Clip
from loadgen.live import PacedChunks, chunk
from loadgen.stats import percentile
from loadgen.writers import markdown_table
from server.config import Settings
from server.embedded import EmbeddedServer

CHANNEL = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]
CHUNK_S = 0.1
"""Real-time streams send 100 ms chunks."""


@dataclass
class Row:
    """One configuration's measurements, accumulated over the blocks it ran in."""

    name: str
    wall_s: float = 0.0
    audio_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)
    """Clip index -> transcript."""
    languages: dict[int, str] = field(default_factory=dict)
    """Clip index -> the language of its first result (served only; "" without results)."""
    batch_sizes: list[int] = field(default_factory=list)
    """The batch each file ran in (in process: the batch size; served: the server's timing)."""
    note: str = ""

    @property
    def files(self) -> int:
        return len(self.latencies_s)

    @property
    def files_per_s(self) -> float:
        return self.files / self.wall_s if self.wall_s else float("nan")

    @property
    def audio_s_per_s(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s else float("nan")

    def p_ms(self, q: float) -> float:
        return percentile(self.latencies_s, q) * 1000.0

    @property
    def mean_batch(self) -> float:
        return sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else float("nan")

    def cells(self) -> list[Any]:
        return [self.name, self.files, f"{self.files_per_s:.2f}", f"{self.audio_s_per_s:.1f}",
                f"{self.p_ms(50):.0f}", f"{self.p_ms(99):.0f}", f"{self.mean_batch:.1f}",
                self.note]  # fmt: skip


HEADER = ["", "files", "files/s", "audio s/s", "p50 ms", "p99 ms", "mean batch", ""]


def table(rows: Sequence[Row]) -> str:
    return markdown_table(HEADER, [r.cells() for r in rows])


class InProcess:
    """Plain transformers `generate` on batches of `batch`, feature extraction included; a
    file's latency is its batch's time."""

    def __init__(self, model: Any, batch: int, name: str = "") -> None:
        self.model, self.batch = model, batch
        self.row = Row(name or f"in-process generate, batch {batch}")
        self.warm = False

    def _generate(self, clips: Sequence[Clip]) -> list[str]:
        hf, extractor = self.model.model, self.model.processor.feature_extractor
        features = extractor(
            [c.samples for c in clips], sampling_rate=16_000, return_tensors="pt"
        ).input_features.to(hf.device, hf.dtype)
        out = hf.generate(features, max_new_tokens=self.model.max_new_tokens)
        return [t.strip() for t in self.model.tokenizer.batch_decode(out, skip_special_tokens=True)]

    async def run(self, clips: Sequence[Clip], indices: Sequence[int]) -> None:
        import torch

        row = self.row
        with torch.inference_mode():
            if not self.warm:  # this batch shape once, untimed
                self._generate([clips[j] for j in indices[: self.batch]])
                self.warm = True
            started = time.perf_counter()
            for i in range(0, len(indices), self.batch):
                part = indices[i : i + self.batch]
                t0 = time.perf_counter()
                texts = self._generate([clips[j] for j in part])
                row.texts.update(zip(part, texts, strict=True))
                row.latencies_s += [time.perf_counter() - t0] * len(part)
                row.batch_sizes += [len(part)] * len(part)
        row.wall_s += time.perf_counter() - started
        row.audio_s += sum(clips[j].duration_s for j in indices)


def served_settings(**overrides: Any) -> Settings:
    """A server measured against `generate`: speech gates off (every file is decoded, as
    `generate` does), a deep queue, and the server's own warm-up before it says SERVING (as
    shipped: with `--compile auto` that compiles the decode step of every row bucket; without
    it every step would run eager, and the study would not measure the server users run).
    `WHISPER_GRPC_COMPILE` chooses the decode step as it does for `python -m server`."""
    base: dict[str, Any] = dict(
        max_queue_size=1024, no_speech_threshold=1.0, silence_dbfs=-200.0, warmup=True,
        metrics_port=-1, compile=os.environ.get("WHISPER_GRPC_COMPILE") or "auto",
    )  # fmt: skip
    return Settings(**{**base, **overrides})


class Served:
    """A real gRPC server on loopback (`server.embedded`, its engine and model worker thread),
    driven by `concurrency` asyncio clients that each send the next file (its bytes, as any
    client would) when the last one returns."""

    def __init__(self, settings: Settings, model: Any, concurrency: int, name: str = "") -> None:
        self.concurrency = concurrency
        self.server = EmbeddedServer(settings, model).start()
        self.row = Row(name or f"{settings.engine} engine, concurrency {concurrency}")
        self.warm = False
        self.decode_step = ""  # how the server ran its decode steps (known at close)

    async def run(self, clips: Sequence[Clip], indices: Sequence[int]) -> None:
        row = self.row
        async with grpc.aio.insecure_channel(self.server.address, options=CHANNEL) as channel:
            stub = asr_pb2_grpc.SpeechStub(channel)

            async def transcribe(clip: Clip) -> tuple[str, int, str]:
                audio = asr_pb2.RecognitionAudio(content=clip.content)
                response = await stub.Recognize(asr_pb2.RecognizeRequest(audio=audio))
                results = list(response.results)
                text = " ".join(r.alternatives[0].transcript for r in results)
                language = results[0].language_code if results else ""
                return text, response.timing.batch_size, language

            if not self.warm:  # the batch shapes this concurrency makes, untimed
                await asyncio.gather(*(transcribe(clips[j]) for j in indices[: self.concurrency]))
                self.warm = True
            cursor = iter(indices)

            async def client() -> None:
                while (i := next(cursor, None)) is not None:
                    t0 = time.perf_counter()
                    text, batch, language = await transcribe(clips[i])
                    row.latencies_s.append(time.perf_counter() - t0)
                    row.texts[i], row.languages[i] = text, language
                    row.batch_sizes.append(batch)

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(self.concurrency)))
            row.wall_s += time.perf_counter() - started
        row.audio_s += sum(clips[j].duration_s for j in indices)

    def close(self) -> None:
        """Stop the server; the continuous engine's own counters go into the row's note."""
        batcher = self.server.handle.batcher if self.server.handle else None
        stats = getattr(batcher, "stats", None)
        s = stats() if callable(stats) else None
        self.decode_step = str(getattr(batcher, "decode_step", "") or "")
        if s is not None:  # the generate engine keeps no such counters (stats() is None)
            self.row.note = (
                f"decode step {self.decode_step}; "
                f"mean decode batch {s.step_rows / max(1, s.decode_steps):.1f}, "
                f"{s.encoder_windows / max(1, s.encoder_batches):.1f} windows per encoder "
                f"call; encode {s.join_s:.0f} s, decode {s.decode_s:.0f} s"
            )
        self.server.stop()


async def take_turns(
    configs: Sequence[InProcess | Served], clips: Sequence[Clip], indices: Sequence[int], block: int
) -> None:
    """`indices` in blocks of `block`, each configuration in turn on the same block, the order
    rotated from block to block, so that the load of other processes on a shared machine falls
    on all of them alike."""
    blocks = [indices[i : i + block] for i in range(0, len(indices), block)]
    for b, part in enumerate(blocks):
        for config in [*configs[b % len(configs) :], *configs[: b % len(configs)]]:
            await config.run(clips, part)


# -- real-time streams ------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamRow:
    streams: int
    first_interim_s: list[float]
    """From the first chunk sent to the first interim result."""
    final_s: list[float]
    """From the last chunk sent to the last final result."""
    missing_interims: int

    def cells(self) -> list[str]:
        def ms(values: list[float], q: float) -> str:
            return f"{percentile(values, q) * 1000:.0f}"

        return [f"{self.streams} stream(s), real time", ms(self.first_interim_s, 50),
                ms(self.first_interim_s, 99), ms(self.final_s, 50), ms(self.final_s, 99),
                ms(self.final_s, 100), str(self.missing_interims)]  # fmt: skip


STREAM_HEADER = ["", "first interim p50 ms", "p99 ms", "final after last chunk p50 ms",
                 "p99 ms", "max ms", "utterances without interim"]  # fmt: skip


def stream_table(rows: Sequence[StreamRow]) -> str:
    return markdown_table(STREAM_HEADER, [r.cells() for r in rows])


def stream_once(stub: asr_pb2_grpc.SpeechStub, clip: Clip) -> tuple[float | None, float]:
    """Stream one clip at real-time pace in 100 ms chunks; returns (first interim delay,
    finalization delay after the last chunk)."""
    paced = PacedChunks(chunk(clip.pcm16(), 16_000, CHUNK_S), CHUNK_S)
    config = asr_pb2.RecognitionConfig(
        encoding=asr_pb2.RecognitionConfig.LINEAR16, sample_rate_hertz=16_000
    )

    def requests() -> Any:
        yield asr_pb2.StreamingRecognizeRequest(
            streaming_config=asr_pb2.StreamingRecognitionConfig(config=config, interim_results=True)
        )
        for piece in paced:
            yield asr_pb2.StreamingRecognizeRequest(audio_content=piece)

    first_interim, last_final = None, 0.0
    for response in stub.StreamingRecognize(requests(), timeout=600):
        now = paced.clock()
        for result in response.results:
            if not result.is_final and first_interim is None:
                first_interim = now - paced.t0
            if result.is_final:
                last_final = now
    return first_interim, max(0.0, last_final - paced.sent[-1])


def stream_row(
    server: EmbeddedServer, clips: Sequence[Clip], streams: int, per_stream: int = 1
) -> StreamRow:
    """`streams` concurrent clients, each streaming `per_stream` clips one after another."""
    stub = server.stub()

    def client(i: int) -> list[tuple[float | None, float]]:
        picks = [clips[(i + k * streams) % len(clips)] for k in range(per_stream)]
        return [stream_once(stub, clip) for clip in picks]

    with ThreadPoolExecutor(streams) as pool:
        outcomes = [o for per_client in pool.map(client, range(streams)) for o in per_client]
    interims = [o[0] for o in outcomes if o[0] is not None]
    return StreamRow(streams, interims, [o[1] for o in outcomes], len(outcomes) - len(interims))
