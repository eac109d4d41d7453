"""Test audio: read once, replayed in a seeded order, each file sent as its original bytes.

Data set specs (`--dataset`):

* `sample` (the default): the LibriSpeech utterances shipped in `samples/LibriSpeech` (27 files
  of test-clean and test-other with their references, CC BY 4.0), so that everything works on a
  fresh clone with no network; `sample:test-clean` or `sample:test-other` for one split;
* a LibriSpeech folder in the official layout, either one split
  (`.../LibriSpeech/test-clean`) or the `LibriSpeech` root holding several splits: every
  `<speaker>-<chapter>.trans.txt` below it gives the references of the `<id>.flac` beside it;
* a plain folder of audio files (FLAC, WAV, OGG, MP3), searched recursively; a `<name>.txt`
  beside `<name>.flac` is its reference (optional: without references there is no WER); a
  `transcripts.txt` of `<id> <text>` lines beside the files works like a `*.trans.txt`;
* `librispeech:<split>`: the OpenSLR tarball of that split, downloaded, verified and unpacked
  into the cache on first use (`loadgen.fetch`);
* `hf:<name>[:<config>[:<split>]]`: a Hugging Face data set (default
  `hf:librispeech_asr:clean:test`), when `datasets` is installed and the hub is reachable.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from loadgen.errors import UsageError

log = logging.getLogger(__name__)

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
"""The audio shipped with the project (samples/README.md says what and under which licence)."""
DEFAULT_DATASET = "sample"

ENCODINGS = {".flac": "FLAC", ".wav": "WAV", ".ogg": "OGG", ".opus": "OGG", ".mp3": ""}
"""File suffix -> RecognitionConfig encoding name ("": let the server read the header)."""


class DatasetError(UsageError, ValueError):
    """The data set spec names nothing usable; the message says what was looked for."""


@dataclass(frozen=True)
class Entry:
    """A file found but not read yet (listing is cheap, reading is not: `--limit` picks first)."""

    id: str
    path: Path
    reference: str | None


@dataclass(frozen=True)
class Item:
    """One utterance, in memory."""

    id: str
    data: bytes
    """The file's bytes, exactly as stored."""
    audio_s: float
    reference: str | None
    encoding: str
    """RecognitionConfig encoding name, or "" for self-describing audio of another kind."""


@dataclass(frozen=True)
class Dataset:
    spec: str
    kind: str
    items: tuple[Item, ...]

    @property
    def references(self) -> dict[str, str]:
        return {i.id: i.reference for i in self.items if i.reference is not None}

    @property
    def audio_s(self) -> float:
        return sum(i.audio_s for i in self.items)

    def fingerprint(self) -> str:
        """Identifies the selection (ids and sizes), so a master can check its workers use the
        same files."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(f"{item.id}:{len(item.data)};".encode())
        return digest.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "files": len(self.items),
            "audio_s": round(self.audio_s, 3),
            "with_reference": len(self.references),
            "fingerprint": self.fingerprint(),
        }


def load_dataset(
    spec: str,
    *,
    limit: int | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
    base_url: str | None = None,
) -> Dataset:
    """Read the data set `spec` names (see the module docstring); with `limit`, a seeded sample
    of that many files."""
    if spec.startswith("hf:"):
        return Dataset(spec, "huggingface", tuple(_huggingface_items(spec, limit)))
    root = resolve_root(spec, cache_dir, base_url)
    entries, kind = local_entries(root)
    if limit is not None and limit > len(entries):
        log.warning(
            "--limit %d but %s holds only %d files: using all %d", limit, spec, len(entries),
            len(entries),
        )  # fmt: skip
    return Dataset(spec, kind, tuple(read_entry(e) for e in select(entries, limit, seed)))


def resolve_root(spec: str, cache_dir: Path | None = None, base_url: str | None = None) -> Path:
    """The folder a local spec names (`sample[:split]`, `librispeech:<split>`, a path)."""
    if spec == "sample" or spec.startswith("sample:"):
        root = SAMPLES / "LibriSpeech" / spec.partition(":")[2]
    elif spec.startswith("librispeech:"):
        from loadgen import fetch

        root = fetch.ensure_librispeech(spec.split(":", 1)[1], cache_dir, base_url)
    else:
        root = Path(spec).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data set folder not found: {root}")
    return root


def local_entries(root: Path) -> tuple[list[Entry], str]:
    """The utterances under a folder, and which kind of folder it is."""
    entries = librispeech_entries(root)
    if entries:
        return entries, "librispeech"
    entries = folder_entries(root)
    if not entries:
        raise DatasetError(f"no *.trans.txt and no audio files ({', '.join(ENCODINGS)}) in {root}")
    return entries, "folder"


def librispeech_entries(root: Path) -> list[Entry]:
    """Utterances of the official layout under root (one split or several), sorted by id."""
    entries = []
    for trans in sorted([*root.rglob("*.trans.txt"), *root.rglob("transcripts.txt")]):
        for line in trans.read_text(encoding="utf-8").splitlines():
            uid, _, text = line.strip().partition(" ")
            audio = _first_existing(trans.parent / f"{uid}{suffix}" for suffix in (".flac", ".wav"))
            if uid and audio is not None:
                entries.append(Entry(uid, audio, text.strip()))
    return sorted(entries, key=lambda e: e.id)


def folder_entries(root: Path) -> list[Entry]:
    """Audio files under root; `<name>.txt` beside one is its reference. Ids are the paths
    relative to root, without suffix, so equal names in different folders stay apart."""
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in ENCODINGS):
        text_file = path.with_suffix(".txt")
        reference = text_file.read_text(encoding="utf-8").strip() if text_file.is_file() else None
        entries.append(Entry(path.relative_to(root).with_suffix("").as_posix(), path, reference))
    return entries


def select(entries: list[Entry], limit: int | None, seed: int) -> list[Entry]:
    """A seeded sample of `limit` entries (all of them without a limit), in id order."""
    if limit is None or limit >= len(entries):
        return list(entries)
    chosen = random.Random(seed).sample(range(len(entries)), limit)
    return [entries[i] for i in sorted(chosen)]


def read_entry(entry: Entry) -> Item:
    data = entry.path.read_bytes()
    return Item(
        entry.id,
        data,
        _duration_s(data, entry.id),
        entry.reference,
        ENCODINGS[entry.path.suffix.lower()],
    )


def _duration_s(data: bytes, name: str) -> float:
    try:
        return float(sf.info(io.BytesIO(data)).duration)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise DatasetError(f"cannot read audio of {name}: {err}") from err


def _first_existing(paths: Iterable[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _huggingface_items(spec: str, limit: int | None) -> list[Item]:
    """Original audio bytes from a Hugging Face data set (Audio(decode=False)); streamed, so
    `--limit N` downloads only about N files. No seeded sample here: the first N rows."""
    try:
        import datasets  # optional: pip install datasets
    except ImportError as err:
        raise DatasetError(
            f"{spec} needs the Hugging Face `datasets` package (pip install datasets) and "
            "network access to the hub; or use a local LibriSpeech folder or librispeech:<split>"
        ) from err
    parts = spec.split(":")[1:]
    name, config, split = [*parts, "", "", ""][:3]
    try:
        rows = datasets.load_dataset(
            name or "librispeech_asr", config or "clean", split=split or "test", streaming=True
        ).cast_column("audio", datasets.Audio(decode=False))
        items: list[Item] = []
        for row in rows:
            if limit is not None and len(items) >= limit:
                break
            items.append(_hf_item(row))
    except Exception as err:  # network, auth, unknown name: one clear message
        raise DatasetError(f"could not load {spec} from the Hugging Face hub: {err}") from err
    if limit is not None and len(items) < limit:
        log.warning(
            "--limit %d but %s holds only %d files: using all of them", limit, spec, len(items)
        )
    return items


def _hf_item(row: dict[str, Any]) -> Item:
    audio = row["audio"]
    data = audio.get("bytes") or Path(audio["path"]).read_bytes()
    uid = str(row.get("id") or Path(audio.get("path") or "").stem)
    suffix = Path(audio.get("path") or ".flac").suffix.lower()
    return Item(uid, data, _duration_s(data, uid), row.get("text"), ENCODINGS.get(suffix, ""))


class ReplayOrder:
    """Endless order over n items: a seeded shuffle, reshuffled at the end of each pass, so
    every file is sent equally often and runs with the same seed send the same sequence."""

    def __init__(self, n: int, seed: int | str) -> None:
        if n < 1:
            raise ValueError("no items to replay")
        self._n = n
        self._rng = random.Random(seed)
        self._pass: list[int] = []

    def next(self) -> int:
        if not self._pass:
            self._pass = list(range(self._n))
            self._rng.shuffle(self._pass)
            self._pass.reverse()  # pop() from the end returns the shuffle's first element first
        return self._pass.pop()


def pcm16(item: Item) -> tuple[bytes, int]:
    """Mono little-endian 16-bit PCM and its rate, for StreamingRecognize (which takes raw
    LINEAR16 chunks rather than files)."""
    samples, rate = sf.read(io.BytesIO(item.data), dtype="int16", always_2d=True)
    mono = samples.mean(axis=1).astype("<i2") if samples.shape[1] > 1 else samples[:, 0]
    return mono.astype("<i2").tobytes(), int(rate)


# -- decoded clips, for the in-process measurements ------------------------------------------
@dataclass(frozen=True)
class Clip:
    """One utterance for the in-process benchmarks: its file (as a client sends it) and its
    16 kHz mono samples (as `generate` takes them)."""

    id: str
    content: bytes
    samples: np.ndarray
    """float32, 16 kHz, mono."""
    reference: str | None

    @property
    def duration_s(self) -> float:
        return len(self.samples) / 16_000

    def pcm16(self) -> bytes:
        """Little-endian 16-bit PCM, for LINEAR16 streams."""
        return (np.clip(self.samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def load_clips(
    spec: str = DEFAULT_DATASET,
    *,
    files: int | None = None,
    min_s: float = 0.0,
    max_s: float = float("inf"),
    cache_dir: Path | None = None,
) -> list[Clip]:
    """The first `files` utterances (in id order) of `min_s`..`max_s` seconds under the data set
    `spec` names (any local spec of `load_dataset`). 16 kHz mono files only: the in-process
    reference feeds samples to the model as they are."""
    root = resolve_root(spec, cache_dir)
    clips: list[Clip] = []
    for entry in local_entries(root)[0]:
        if files is not None and len(clips) >= files:
            break
        info = sf.info(entry.path)
        if not min_s <= info.duration <= max_s:
            continue
        if info.samplerate != 16_000 or info.channels != 1:
            log.warning("%s: %d Hz, %d channel(s); only 16 kHz mono is used here", entry.id,
                        info.samplerate, info.channels)  # fmt: skip
            continue
        samples, _ = sf.read(entry.path, dtype="float32")
        clips.append(Clip(entry.id, entry.path.read_bytes(), samples, entry.reference))
    if not clips:
        raise DatasetError(f"no 16 kHz mono clips of {min_s:g}-{max_s:g} s under {root}")
    return clips
