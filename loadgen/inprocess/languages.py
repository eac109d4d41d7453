"""`python -m loadgen languages`: which language a model detects on speech in other languages,
through the server (language detection inside the shared decode) and through transformers'
`generate` (the reference), clip by clip.

    python -m loadgen languages --model base --out runs/languages
    python -m loadgen languages --model base --clips DIR --out runs/languages

The clips are made here with `espeak-ng` (one sentence per voice of `--voices`: synthetic,
accented speech, a harder test than a native speaker) and/or read from `--clips DIR`, whose
files are named by language (`fr.wav`, `de-2.flac`: the language is the name up to the first
`-`, `_` or `.`), each one window of at most 30 s. The server gets each file's bytes as a
client sends them; `generate` gets the samples the server decodes from them (`server.audio`).
Every request leaves the language to the model (no `language_code`). Writes OUT/languages.csv,
languages.json and languages.md; prints the table. An English-only model has nothing to
detect: it answers "en" for every clip, as its server does.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadgen.dataset import Clip
from loadgen.errors import UsageError
from loadgen.writers import markdown_table, write_csv, write_json

log = logging.getLogger(__name__)

Spoken = tuple[str, Clip]
"""The language spoken (the voice's, or the file name's) and the clip."""

SENTENCES = {  # our own sentences, a few seconds each
    "fr": "Le train pour Lyon part à huit heures, mais il faut acheter les billets avant midi.",
    "de": "Wir treffen uns morgen früh am Bahnhof, weil der Zug nach Hamburg pünktlich fährt.",
    "es": "Mañana por la mañana vamos al mercado para comprar fruta fresca y pan caliente.",
    "it": "Domani andiamo al mare con i bambini, se il tempo resta bello come oggi.",
    "pt": "Amanhã vamos visitar os nossos avós no campo, e voltamos para casa no domingo.",
    "nl": "Morgen gaan we met de fiets naar het strand, als het niet te hard waait.",
    "pl": "Jutro rano pojedziemy pociągiem do Krakowa, żeby odwiedzić naszych przyjaciół.",
    "ru": "Завтра утром мы поедем на поезде в Москву, чтобы навестить наших друзей.",
}
DEFAULT_VOICES = ",".join(SENTENCES)


@dataclass(frozen=True)
class LanguageRow:
    clip: str
    spoken: str
    audio_s: float
    server: str
    """The language the server detected (its result's language_code)."""
    generate: str
    """The language transformers' generate detected (the reference)."""
    server_text: str
    generate_text: str


WINDOW_S = 30.0  # Whisper detects a language per 30 s window: one window per clip here


def as_clip(name: str, data: bytes) -> Clip:
    """A clip of `data` (a file's bytes, sent as they are), decoded as the server decodes it,
    so that `generate` gets the very samples the server works on."""
    from server.audio import AudioFormat, decode
    from server.errors import InvalidAudioError

    try:
        samples = decode(data, AudioFormat(), WINDOW_S)
    except InvalidAudioError as err:
        raise UsageError(f"{name}: {err} (one window of at most {WINDOW_S:g} s per clip)") from err
    return Clip(name, data, samples, None)


def synthesize(voices: Sequence[str]) -> list[Spoken]:
    """One sentence per voice, spoken by espeak-ng (which writes 22.05 kHz WAV)."""
    if shutil.which("espeak-ng") is None:
        raise UsageError(
            "espeak-ng is not installed (apt-get install espeak-ng), or pass --voices '' "
            "and --clips DIR with recordings named by language"
        )
    unknown = [v for v in voices if v not in SENTENCES]
    if unknown:
        raise UsageError(f"no sentence for voice(s) {', '.join(unknown)}; have {DEFAULT_VOICES}")
    clips = []
    with tempfile.TemporaryDirectory() as tmp:
        for voice in voices:
            wav = Path(tmp) / f"{voice}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), SENTENCES[voice]],
                           check=True, timeout=60, capture_output=True)  # fmt: skip
            clips.append((voice, as_clip(f"espeak-{voice}", wav.read_bytes())))
    return clips


def read_clips(folder: Path) -> list[Spoken]:
    clips = []
    for path in sorted(p for p in folder.iterdir() if p.suffix in {".wav", ".flac", ".ogg"}):
        language = re.split(r"[-_.]", path.name, maxsplit=1)[0].lower()
        clips.append((language, as_clip(path.name, path.read_bytes())))
    if not clips:
        raise UsageError(f"{folder}: no .wav, .flac or .ogg files")
    return clips


async def served(settings: Any, model: Any, clips: Sequence[Clip]) -> list[tuple[str, str]]:
    """(language_code, transcript) of each clip through the server, language left unset."""
    from loadgen.inprocess.measure import Served

    server = Served(settings, model, concurrency=1)
    try:
        await server.run(clips, range(len(clips)))
    finally:
        server.close()
    row = server.row
    return [(row.languages[i], row.texts[i]) for i in range(len(clips))]


def generated(model: Any, clips: Sequence[Clip]) -> list[tuple[str, str]]:
    """(language, transcript) of each clip through transformers' generate, language unset."""
    from server.models.base import DecodeOptions, WindowTask

    out = []
    for clip in clips:
        task = WindowTask(model.prepare(clip.samples), clip.duration_s, DecodeOptions())
        (result,) = model.run_batch([task])
        out.append((result.language, result.text))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadgen languages",
        description="the language a model detects on other languages' speech, server and "
        "generate side by side",
    )
    parser.add_argument("--model", default="base", help="a built-in name or a local folder [base]")
    parser.add_argument(
        "--voices",
        default=DEFAULT_VOICES,
        help=f"espeak-ng voices to synthesize, '' for none [{DEFAULT_VOICES}]",
    )
    parser.add_argument("--clips", type=Path, help="a folder of recordings named by language")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads [0: all cores]")
    parser.add_argument(
        "--max-new-tokens", type=int, default=440, help="tokens per window at most [440]"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/languages"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        voices = [v.strip() for v in args.voices.split(",") if v.strip()]
        clips = synthesize(voices) if voices else []
        if args.clips is not None:
            clips += read_clips(args.clips)
        if not clips:
            raise UsageError("no clips: give --voices and/or --clips")
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = asyncio.run(measure(args, clips))
    data = [dataclasses.asdict(r) for r in rows]
    columns = [f.name for f in dataclasses.fields(LanguageRow)]
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "languages.csv", columns, data)
    write_json(args.out / "languages.json", {"model": args.model, "rows": data})
    shown = ["clip", "spoken", "audio_s", "server", "generate", "server_text"]
    table = markdown_table(shown, [[d[c] for c in shown] for d in data])
    agree = sum(r.server == r.generate for r in rows)
    right = sum(r.server == r.spoken for r in rows)
    same = sum(r.server_text == r.generate_text for r in rows)
    summary = (f"{args.model}: the server detected the spoken language on {right} of "
               f"{len(rows)} clips; it agreed with generate on {agree} of {len(rows)} "
               f"(transcripts equal on {same})")  # fmt: skip
    (args.out / "languages.md").write_text(f"{table}\n\n{summary}\n")
    print(table)
    print(summary)
    return 0


async def measure(args: argparse.Namespace, spoken: Sequence[Spoken]) -> list[LanguageRow]:
    from loadgen.inprocess.measure import served_settings
    from server.models.loader import load_model

    settings = served_settings(model=args.model, device=args.device, dtype=args.dtype,
                               num_threads=args.threads,
                               max_new_tokens=args.max_new_tokens)  # fmt: skip
    model = load_model(settings)
    clips = [clip for _, clip in spoken]
    by_server = await served(settings, model, clips)
    by_generate = await asyncio.to_thread(generated, model, clips)
    return [
        LanguageRow(c.id, language, round(c.duration_s, 2), s[0], g[0], s[1], g[1])
        for (language, c), s, g in zip(spoken, by_server, by_generate, strict=True)
    ]
