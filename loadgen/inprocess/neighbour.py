"""What one client's options cost its neighbours: a real gRPC server in this process (loopback),
one "heavy" client, and a neighbour whose latency is compared with its idle latency.

    python -m loadgen neighbour fallback   # beam_size 5 on back-to-back 60 s
    python -m loadgen neighbour words      # a stream with word time offsets
    python -m loadgen neighbour detect --model base --dataset DIR/test-other  # detection vs 'en'

`fallback` and `words`: the neighbour sends the JFK clip one request after the other, first
alone (idle), then beside the heavy client; prints p50/max and the ratio to idle (target: the
p50 within 2x). `detect`: `--files` test-other files at concurrency 8, language left to
detection, then `language_code: en`, interleaved in blocks; prints files/s (target: detection
within 15%). Extra `--set name=value` pairs go to the server's Settings (e.g.
`--set max_fallback_share=1` for a fallback that runs to its end).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from asr.v1 import asr_pb2, asr_pb2_grpc
from loadgen.dataset import DEFAULT_DATASET, SAMPLES, local_entries, resolve_root
from server.config import Settings
from server.embedded import EmbeddedServer

JFK = SAMPLES / "jfk.flac"


def _flac(samples: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, samples, 16_000, format="FLAC")
    return buf.getvalue()


def _test_other(dataset: str, n: int) -> list[Path]:
    """The first n utterances of the data set (LibriSpeech layout or a folder), by id."""
    entries, _ = local_entries(resolve_root(dataset))
    return [e.path for e in entries[:n]]


def _speech(dataset: str, seconds: float) -> np.ndarray:
    """The data set's utterances back to back (repeated if short), cut at `seconds`."""
    paths, parts, total = _test_other(dataset, 400), [], 0
    while total < seconds * 16_000:
        for path in paths:
            samples, _ = sf.read(path, dtype="float32")
            parts.append(samples)
            total += len(samples)
            if total >= seconds * 16_000:
                break
    return np.concatenate(parts)[: int(seconds * 16_000)]


def _request(content: bytes, **config: object) -> asr_pb2.RecognizeRequest:
    return asr_pb2.RecognizeRequest(
        config=asr_pb2.RecognitionConfig(**config),  # type: ignore[arg-type]
        audio=asr_pb2.RecognitionAudio(content=content),
    )


def _neighbour(stub: asr_pb2_grpc.SpeechStub, jfk: bytes, n: int) -> list[float]:
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        stub.Recognize(_request(jfk, language_code="en"), timeout=600)
        latencies.append(time.perf_counter() - started)
    return latencies


def _summary(name: str, lat: list[float], idle: float | None = None) -> float:
    p50 = statistics.median(lat)
    ratio = f"  {p50 / idle:.2f}x idle" if idle else ""
    print(f"{name:>10}: n={len(lat)} p50 {p50:.3f} s  max {max(lat):.3f} s{ratio}", flush=True)
    return p50


def _beside(server: EmbeddedServer, jfk: bytes, n: int, heavy: object) -> list[float]:
    """The neighbour's latencies while `heavy(stub, stop)` runs on a thread."""
    stop = threading.Event()
    started = threading.Event()

    def run() -> None:
        stub = server.stub()
        started.set()
        heavy(stub, stop)  # type: ignore[operator]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait()
    try:
        return _neighbour(server.stub(), jfk, n)
    finally:
        stop.set()
        thread.join(600)


def _fallback_client(content: bytes, beam: int):
    def heavy(stub: asr_pb2_grpc.SpeechStub, stop: threading.Event) -> None:
        while not stop.is_set():
            stub.Recognize(_request(content, language_code="en", beam_size=beam), timeout=600)

    return heavy


def _stream_client(samples: np.ndarray, speed: float):
    """Streams LINEAR16 in 100 ms chunks at `speed` x real time, interims on, word times on."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    chunk = 3200  # bytes: 100 ms

    def heavy(stub: asr_pb2_grpc.SpeechStub, stop: threading.Event) -> None:
        while not stop.is_set():
            config = asr_pb2.StreamingRecognitionConfig(
                config=asr_pb2.RecognitionConfig(
                    encoding=asr_pb2.RecognitionConfig.LINEAR16, sample_rate_hertz=16_000,
                    language_code="en", enable_word_time_offsets=True,
                ),
                interim_results=True,
            )  # fmt: skip

            def requests(config: asr_pb2.StreamingRecognitionConfig = config):
                yield asr_pb2.StreamingRecognizeRequest(streaming_config=config)
                for i in range(0, len(pcm), chunk):
                    if stop.wait(0.1 / speed):  # pacing a real-time client, not a state wait
                        return
                    yield asr_pb2.StreamingRecognizeRequest(audio_content=pcm[i : i + chunk])

            for _ in stub.StreamingRecognize(requests(), timeout=3600):
                pass

    return heavy


def _detect(server: EmbeddedServer, files: list[bytes], rounds: int) -> None:
    stub = server.stub()
    rates: dict[str, list[float]] = {"detect": [], "en": []}
    with ThreadPoolExecutor(8) as pool:
        for _ in range(rounds):
            for name, language in (("detect", ""), ("en", "en")):
                started = time.perf_counter()
                requests = [_request(c, language_code=language) for c in files]
                list(pool.map(lambda r: stub.Recognize(r, timeout=600), requests))
                rates[name].append(len(files) / (time.perf_counter() - started))
    detect, en = statistics.median(rates["detect"]), statistics.median(rates["en"])
    print(f"detect {detect:.2f} files/s, en {en:.2f} files/s: detection at {detect / en:.0%}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=["fallback", "words", "detect"])
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--dataset", default=DEFAULT_DATASET, help="the heavy client's speech (detect: its files)"
    )
    parser.add_argument("--requests", type=int, default=8, help="neighbour requests per phase")
    parser.add_argument("--files", type=int, default=16, help="detect: test-other files")
    parser.add_argument("--rounds", type=int, default=2, help="detect: blocks of each")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--speed", type=float, default=2.0, help="words: x real time")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    overrides = {}
    for pair in args.set:
        name, _, value = pair.partition("=")
        default = getattr(Settings(), name)
        overrides[name] = type(default)(value)
    settings = Settings(model=args.model, dtype=args.dtype, metrics_port=-1, **overrides)
    from server.models.loader import load_model

    server = EmbeddedServer(settings, load_model(settings)).start()
    try:
        if args.scenario == "detect":
            files = [p.read_bytes() for p in _test_other(args.dataset, args.files)]
            _detect(server, files, args.rounds)
            return 0
        jfk = JFK.read_bytes()
        _neighbour(server.stub(), jfk, 2)  # warm
        idle = _summary("idle", _neighbour(server.stub(), jfk, args.requests))
        if args.scenario == "fallback":
            heavy = _fallback_client(_flac(_speech(args.dataset, 60)), args.beam_size)
        else:
            heavy = _stream_client(_speech(args.dataset, 180), args.speed)
        _summary(args.scenario, _beside(server, jfk, args.requests, heavy), idle)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
