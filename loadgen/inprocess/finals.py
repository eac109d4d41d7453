"""Stream finals against unary transcripts of the same files: `python -m loadgen finals`.

Each file goes once through `Recognize` and once as its own live stream (LINEAR16 in 100 ms
chunks, `--pace` times real time, interim results on as a live client would have them), with
`--streams` streams at a time. Printed: the WER of each, how many transcripts differ, and the
differing pairs. Against `--target` it measures a running server; without it, an in-process
server with `--model`/`--dtype` (the server's defaults otherwise).

    python -m loadgen finals --dataset ../shared/data/LibriSpeech/test-other --limit 40 \\
        --streams 4 --pace 1
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from asr.v1 import asr_pb2, asr_pb2_grpc
from loadgen.dataset import Item, load_dataset, pcm16
from loadgen.live import PACE_MAX, PacedChunks, chunk, parse_pace

Config = asr_pb2.RecognitionConfig
CHUNK_S = 0.1


@dataclass(frozen=True)
class Pair:
    item_id: str
    reference: str
    unary: str
    stream: str
    utterances: int  # finals of the stream
    unequal_finals: list[tuple[str, str]]  # (final, Recognize of its audio), normalized unequal


def unary(stub: asr_pb2_grpc.SpeechStub, item: Item) -> str:
    request = asr_pb2.RecognizeRequest(audio=asr_pb2.RecognitionAudio(content=item.data))
    response = stub.Recognize(request, timeout=600)
    return " ".join(r.alternatives[0].transcript for r in response.results if r.alternatives)


@dataclass(frozen=True)
class Final:
    text: str
    start_s: float
    end_s: float


def stream(stub: asr_pb2_grpc.SpeechStub, item: Item, pace: float, interim: bool) -> list[Final]:
    """The finals of one live stream of the item's audio."""
    pcm, rate = pcm16(item)
    paced = PacedChunks(chunk(pcm, rate, CHUNK_S), CHUNK_S, pace)

    def requests() -> Iterator[asr_pb2.StreamingRecognizeRequest]:
        config = asr_pb2.StreamingRecognitionConfig(
            config=Config(encoding=Config.LINEAR16, sample_rate_hertz=rate, audio_channel_count=1),
            interim_results=interim,
        )
        yield asr_pb2.StreamingRecognizeRequest(streaming_config=config)
        for piece in paced:
            yield asr_pb2.StreamingRecognizeRequest(audio_content=piece)

    finals = []
    for response in stub.StreamingRecognize(requests(), timeout=600):
        for r in response.results:
            if r.is_final and r.alternatives:
                start_s = r.result_start_time.ToNanoseconds() / 1e9
                end_s = r.result_end_time.ToNanoseconds() / 1e9
                finals.append(Final(r.alternatives[0].transcript.strip(), start_s, end_s))
    return finals


def unary_of(stub: asr_pb2_grpc.SpeechStub, item: Item, final: Final) -> str:
    """Recognize of exactly the audio a final covers (what the final should say)."""
    pcm, rate = pcm16(item)
    piece = pcm[2 * round(final.start_s * rate) : 2 * round(final.end_s * rate)]
    config = Config(encoding=Config.LINEAR16, sample_rate_hertz=rate, audio_channel_count=1)
    request = asr_pb2.RecognizeRequest(config=config, audio=asr_pb2.RecognitionAudio(content=piece))
    response = stub.Recognize(request, timeout=600)
    return " ".join(
        r.alternatives[0].transcript.strip() for r in response.results if r.alternatives
    )


def compare(
    address: str, items: list[Item], streams: int, pace: float, interim: bool = True
) -> list[Pair]:
    """Unary transcripts one file at a time, then the streams `streams` at a time, then each
    final against Recognize of its own audio."""
    from loadgen.wer import normalize

    with grpc.insecure_channel(address) as channel:
        stub = asr_pb2_grpc.SpeechStub(channel)
        unaries = [unary(stub, item) for item in items]
        with concurrent.futures.ThreadPoolExecutor(streams) as pool:
            finals = list(pool.map(lambda i: stream(stub, i, pace, interim), items))
        pairs = []
        for item, text, fs in zip(items, unaries, finals, strict=True):
            own = [(f.text, unary_of(stub, item, f)) for f in fs]
            pairs.append(
                Pair(
                    item.id,
                    item.reference or "",
                    text.strip(),
                    " ".join(f.text for f in fs if f.text),
                    len(fs),
                    [(a, b) for a, b in own if normalize(a) != normalize(b)],
                )
            )
    return pairs


def summary(pairs: list[Pair]) -> dict[str, object]:
    from loadgen.wer import normalize, word_error_rate

    refs = [p.reference for p in pairs]
    differ = [p for p in pairs if normalize(p.unary) != normalize(p.stream)]
    return {
        "files": len(pairs),
        "unary_wer": word_error_rate(refs, [p.unary for p in pairs]),
        "stream_wer": word_error_rate(refs, [p.stream for p in pairs]),
        "differ": len(differ),
        "split": sum(p.utterances > 1 for p in pairs),
        "unequal_finals": sum(len(p.unequal_finals) for p in pairs),
        "finals": sum(p.utterances for p in pairs),
        "differing": [vars(p) for p in differ],
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen finals", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="a LibriSpeech split folder")
    p.add_argument("--limit", type=int, default=40, help="files (a seeded sample) [40]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--streams", type=int, default=4, help="concurrent streams [4]")
    p.add_argument("--pace", default="1", help="times real time, or max [1]")
    p.add_argument("--no-interim", action="store_true", help="streams without interim results")
    p.add_argument("--target", help="host:port of a running server (default: in-process)")
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", type=Path, help="write the summary here too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    items = list(load_dataset(args.dataset, limit=args.limit, seed=args.seed).items)
    pace = parse_pace(args.pace)
    server = None
    address = args.target
    if address is None:
        from server.config import Settings
        from server.embedded import EmbeddedServer
        from server.models.loader import load_model

        settings = Settings(model=args.model, dtype=args.dtype)
        server = EmbeddedServer(settings, lambda: load_model(settings)).start()
        address = server.address
    started = time.monotonic()
    try:
        pairs = compare(address, items, args.streams, pace, not args.no_interim)
    finally:
        if server is not None:
            server.stop()
    result = summary(pairs)
    for p in result["differing"]:  # type: ignore[attr-defined]
        print(f"{p['item_id']} ({p['utterances']} finals)")
        print(f"  unary : {p['unary']}\n  stream: {p['stream']}")
        for final, own in p["unequal_finals"]:
            print(f"  final {final!r} != unary of its audio {own!r}")
    pace_text = "max" if pace == PACE_MAX else f"{pace:g}x"
    print(
        f"{result['files']} files, {args.streams} streams at {pace_text}: "
        f"unary WER {100 * result['unary_wer']:.2f}%, "  # type: ignore[operator]
        f"stream WER {100 * result['stream_wer']:.2f}%, "  # type: ignore[operator]
        f"{result['differ']} transcripts differ; {result['split']} files cut in several "
        f"utterances; {result['unequal_finals']} of {result['finals']} finals differ from "
        f"Recognize of their own audio ({time.monotonic() - started:.0f} s)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
