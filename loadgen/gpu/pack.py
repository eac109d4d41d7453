"""Everything the GPU check (`python -m loadgen.gpu.check`) needs on a machine with no network,
in under 60 MiB together with the repository: tiny.en with int8 weights, some LibriSpeech files,
the CPU's float32 transcripts of them on the same dequantized weights, and the wheels of every
distribution the server and the check import that the GPU machine lacks.

    python -m loadgen.gpu.pack [--out .gpu-pack] [--dataset DIR] [--files 40] [--no-wheels]
    python -m loadgen.gpu.pack unpack PACK/model OUT_DIR      (done by the check itself)

tiny.en is 145 MB in float32. Here every 2-D weight matrix except the position embeddings is
stored as int8 with one float16 scale per row (absmax / 127), the rest in float16: about 40 MB.
On arrival the int8 rows are multiplied back into float16: close to tiny.en, not equal to it,
so the GPU's transcripts are compared with the CPU's float32 transcripts of the same
dequantized weights (`reference.json`, made here), never with figures of the original weights.

The wheels: `loadgen.gpu.needs` derives from the code which distributions must travel
(`machine_packages.txt` is the machine's list); the pack refuses to build when `WHEELS` misses
one or when constraints.txt has no pin for one.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from loadgen.gpu.needs import Needs

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
MANIFEST = "int8_manifest.json"
WEIGHTS = "model.int8.safetensors"
REFERENCE = "reference.json"
BUDGET_MIB = 60.0
# The checkpoint files that travel besides the weights (tokenizer.json is left behind: the slow
# tokenizer's vocab.json + merges.txt give the same ids; normalizer.json is the WER spelling map).
SIDE_FILES = (
    "config.json", "generation_config.json", "preprocessor_config.json", "vocab.json",
    "merges.txt", "normalizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json",
)  # fmt: skip
# What travels as wheels, at constraints.txt's pins. tests/unit/test_gpu_pack.py checks this
# against what `loadgen.gpu.needs` derives from the code.
WHEELS = (
    "grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf",
    "googleapis-common-protos", "soundfile", "cffi", "pycparser", "soxr", "typing-extensions",
)  # fmt: skip
# On the machine, but at versions we can't see: the generated stubs need protobuf >= 7.35 and
# grpcio-health-checking 1.85 needs grpcio >= 1.85, so ours travel (and their requirements).
CARRIED_ANYWAY = ("grpcio", "protobuf")
PLATFORMS = (
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
    "manylinux2014_x86_64", "manylinux1_x86_64",
)  # fmt: skip


class PackError(RuntimeError):
    """The pack can't be made complete: the message says what is missing."""


def quantize(name: str, array: np.ndarray) -> bool:
    """Which tensors become int8: weight matrices, not position embeddings (small, and
    sinusoidal in the encoder, where rounding would blur every frame alike)."""
    return array.ndim == 2 and "embed_positions" not in name and array.size >= 4096


def pack_weights(checkpoint: Path, out: Path) -> dict[str, int]:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(checkpoint / "model.safetensors"))
    packed: dict[str, np.ndarray] = {}
    manifest: dict[str, str] = {}
    for name, array in tensors.items():
        array = array.astype(np.float32)
        if quantize(name, array):
            scale = np.abs(array).max(axis=1, keepdims=True) / 127.0
            scale[scale == 0] = 1.0
            packed[f"{name}.q"] = np.clip(np.rint(array / scale), -127, 127).astype(np.int8)
            packed[f"{name}.scale"] = scale.astype(np.float16)
            manifest[name] = "int8-row"
        else:
            packed[name] = array.astype(np.float16)
            manifest[name] = "float16"
    save_file(packed, str(out / WEIGHTS))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    for side in SIDE_FILES:
        if (checkpoint / side).exists():
            shutil.copy(checkpoint / side, out / side)
    return {kind: sum(1 for k in manifest.values() if k == kind) for kind in set(manifest.values())}


def unpack(pack: Path, out: Path) -> Path:
    """A float16 transformers checkpoint in `out` from a packed model folder."""
    from safetensors.numpy import load_file, save_file

    manifest = json.loads((pack / MANIFEST).read_text())
    packed = load_file(str(pack / WEIGHTS))
    tensors = {}
    for name, kind in manifest.items():
        if kind == "int8-row":
            rows = packed[f"{name}.q"].astype(np.float32) * packed[f"{name}.scale"]
            tensors[name] = rows.astype(np.float16)
        else:
            tensors[name] = packed[name]
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for side in SIDE_FILES:
        if (pack / side).exists():
            shutil.copy(pack / side, out / side)
    return out


def pack_audio(dataset: Path, out: Path, files: int) -> int:
    """The first `files` utterances of test-other (`dataset` is LibriSpeech's root or the
    split itself), kept in LibriSpeech's layout (FLAC files and a
    `<speaker>-<chapter>.trans.txt` beside them) so `loadgen.dataset` reads them."""
    out.mkdir(parents=True, exist_ok=True)
    taken = 0
    split = dataset / "test-other" if (dataset / "test-other").is_dir() else dataset
    for trans in sorted(split.rglob("*.trans.txt")):
        kept = []
        for line in trans.read_text().splitlines():
            src = trans.parent / f"{line.partition(' ')[0]}.flac"
            if src.exists() and taken < files:
                shutil.copy(src, out / src.name)
                kept.append(line)
                taken += 1
        if kept:
            (out / trans.name).write_text("\n".join(kept) + "\n")
    return taken


def pins(constraints: Path = ROOT / "constraints.txt") -> dict[str, str]:
    from loadgen.gpu.needs import canonical

    out = {}
    for line in constraints.read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, _, version = line.partition("==")
            out[canonical(name.strip())] = version.strip()
    return out


def wheel_requirements(wheels: tuple[str, ...] = WHEELS) -> list[str]:
    """name==version for each wheel, at constraints.txt's pins; a missing pin is an error."""
    pinned = pins()
    missing = [w for w in wheels if w not in pinned]
    if missing:
        raise PackError(f"no pin in constraints.txt for {', '.join(missing)}")
    return [f"{w}=={pinned[w]}" for w in wheels]


def check_complete(wheels: tuple[str, ...] = WHEELS, needs: Needs | None = None) -> None:
    """Raise if the code imports (or a carried wheel requires) a distribution the GPU machine
    lacks and `wheels` doesn't carry."""
    from loadgen.gpu.needs import derive

    needs = needs or derive(carried=CARRIED_ANYWAY)
    problems = [f"{m} (imported by {', '.join(f)}): no installed distribution provides it"
                for m, f in needs.unresolved.items()]  # fmt: skip
    problems += [f"{d}: {needs.why(d)}" for d in sorted(needs.must_travel - set(wheels))]
    if problems:
        raise PackError("the pack would miss: " + "; ".join(problems))


def pack_wheels(out: Path) -> None:
    command = [
        sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.12", "--implementation", "cp", "-d", str(out),
        *(arg for p in PLATFORMS for arg in ("--platform", p)), *wheel_requirements(),
    ]  # fmt: skip
    subprocess.run(command, check=True)


def reference_transcripts(checkpoint: Path, audio: Path) -> dict[str, str]:
    """The CPU's float32 transcripts of the dequantized weights: what the GPU's should match."""
    import io

    import soundfile as sf

    from loadgen.dataset import load_dataset
    from server.models.base import WindowTask
    from server.models.whisper import WhisperModel

    model = WhisperModel(str(checkpoint), "tiny.en (int8 pack)", device="cpu", dtype="float32")
    items = load_dataset(str(audio)).items
    out: dict[str, str] = {}
    for start in range(0, len(items), 8):
        batch = items[start : start + 8]
        tasks = [
            WindowTask(model.prepare(sf.read(io.BytesIO(i.data), dtype="float32")[0]), i.audio_s)
            for i in batch
        ]
        for item, result in zip(batch, model.run_batch(tasks), strict=True):
            out[item.id] = result.text
    return out


def size_mib(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths if p.is_file()) / 2**20


def tree_files() -> list[Path]:
    """The files that travel with the pack: tracked and untracked-not-ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout  # fmt: skip
    return [ROOT / p for p in listed.decode().split("\0") if p]


def tree_commit() -> dict[str, object]:
    """The commit the pack was made at (the GPU machine may get the tree without .git)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip()),
    }


def build(args: argparse.Namespace) -> int:
    from server.checkpoints.provision import resolve_model

    if args.wheels:
        check_complete()
        wheel_requirements()
    resolved = resolve_model(args.model, Path.home() / ".cache" / "whisper-grpc")
    assert resolved.local_path is not None
    shutil.rmtree(args.out, ignore_errors=True)
    (args.out / "model").mkdir(parents=True)
    kinds = pack_weights(resolved.local_path, args.out / "model")
    from loadgen.dataset import resolve_root

    n = pack_audio(resolve_root(args.dataset), args.out / "audio", args.files)
    if n == 0:
        raise PackError(f"no test-other utterances under {args.dataset}")
    if args.wheels:
        pack_wheels(args.out / "wheels")
    if args.reference:
        checkpoint = unpack(args.out / "model", args.out / ".unpacked")
        reference = reference_transcripts(checkpoint, args.out / "audio")
        shutil.rmtree(args.out / ".unpacked")
        (args.out / REFERENCE).write_text(json.dumps(reference, indent=1, sort_keys=True))
    (args.out / "tree.json").write_text(json.dumps(tree_commit()))
    pack = size_mib(list(args.out.rglob("*")))
    tree = size_mib(tree_files())
    print(f"{args.out}: model ({kinds}), {n} files, pack {pack:.1f} MiB + tree {tree:.1f} MiB",
          file=sys.stderr)  # fmt: skip
    if pack + tree > BUDGET_MIB:
        print(f"pack + tree is {pack + tree:.1f} MiB, over {BUDGET_MIB:.0f}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["unpack"]:
        if len(argv) != 3:
            print("usage: python -m loadgen.gpu.pack unpack PACK/model OUT_DIR", file=sys.stderr)
            return 2
        print(unpack(Path(argv[1]), Path(argv[2])))
        return 0
    parser = argparse.ArgumentParser(
        prog="loadgen.gpu.pack", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-pack")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument(
        "--dataset",
        default="librispeech:test-other",
        help="LibriSpeech test-other: its folder (or LibriSpeech's root), or librispeech:test-other"
        " (downloaded once)",
    )
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--wheels", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CPU float32 transcripts of the dequantized weights (reference.json)",
    )
    args = parser.parse_args(argv[1:] if argv[:1] == ["pack"] else argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return build(args)
    except (PackError, subprocess.CalledProcessError) as e:
        print(f"gpu-pack: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
