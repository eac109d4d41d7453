"""Everything the GPU check (`scripts/gpu_check.sh`) needs on a machine with no network, in
under 60 MB: tiny.en with int8 weights, some LibriSpeech files, and the wheels the server needs
beyond what a CUDA PyTorch image has.

    .venv/bin/python scripts/gpu_pack.py pack [--out .gpu-pack] [--dataset DIR] [--files 40]
        [--wheels | --no-wheels]
    python scripts/gpu_pack.py unpack PACK/model OUT_DIR      (done by gpu_check.py itself)

tiny.en is 145 MB in float32 and about 75 MB in float16. Here every 2-D weight matrix except
the position embeddings is stored as int8 with one float16 scale per row (absmax / 127), and the
rest (biases, norms, position embeddings, the two convolutions) in float16: about 40 MB. On
arrival the int8 rows are multiplied back into float16. The result is close to tiny.en, not
equal to it: the GPU check says so in its output, and compares the GPU's transcripts with the
CPU's on the same dequantized weights, never with figures measured on the original weights.
The tokenizer travels as vocab.json + merges.txt (the slow tokenizer gives the same ids as
tokenizer.json, which is 3.7 MB more).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "int8_manifest.json"
WEIGHTS = "model.int8.safetensors"
# The checkpoint files that travel besides the weights (tokenizer.json is left behind).
SIDE_FILES = (
    "config.json", "generation_config.json", "preprocessor_config.json", "vocab.json",
    "merges.txt", "normalizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json",
)  # fmt: skip
# Wheels the server needs on Python 3.12 that a CUDA PyTorch image may lack (or have older
# than our generated stubs accept): name==version, as constraints.txt pins them.
WHEELS = (
    "grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "soundfile", "cffi",
    "pycparser", "soxr",
)  # fmt: skip


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
    """The first `files` utterances of test-other (FLAC) and their transcripts."""
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for trans in sorted((dataset / "test-other").rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            uid = line.partition(" ")[0]
            src = trans.parent / f"{uid}.flac"
            if src.exists() and len(lines) < files:
                shutil.copy(src, out / src.name)
                lines.append(line)
    (out / "transcripts.txt").write_text("\n".join(lines) + "\n")
    return len(lines)


def pack_wheels(out: Path) -> None:
    pins = dict(
        line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )  # fmt: skip
    wanted = [f"{name}=={pins[name]}" for name in WHEELS if name in pins]
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    command = [
        sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.12", "--implementation", "cp", "-d", str(out),
        *(arg for p in platforms for arg in ("--platform", p)), *wanted,
    ]  # fmt: skip
    subprocess.run(command, check=True)


def size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("pack")
    pack.add_argument("--out", type=Path, default=ROOT / ".gpu-pack")
    pack.add_argument("--model", default="tiny.en")
    pack.add_argument(
        "--dataset", type=Path, default=ROOT.parent / "shared" / "data" / "LibriSpeech"
    )
    pack.add_argument("--files", type=int, default=40)
    pack.add_argument("--wheels", action=argparse.BooleanOptionalAction, default=True)
    unpacking = sub.add_parser("unpack")
    unpacking.add_argument("pack", type=Path)
    unpacking.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "unpack":
        print(unpack(args.pack, args.out))
        return 0
    sys.path.insert(0, str(ROOT))
    from server.checkpoints.provision import resolve_model

    resolved = resolve_model(args.model, Path.home() / ".cache" / "whisper-grpc")
    assert resolved.local_path is not None
    shutil.rmtree(args.out, ignore_errors=True)
    (args.out / "model").mkdir(parents=True)
    kinds = pack_weights(resolved.local_path, args.out / "model")
    n = pack_audio(args.dataset, args.out / "audio", args.files)
    if args.wheels:
        pack_wheels(args.out / "wheels")
    total = size_mb(args.out)
    print(f"{args.out}: model {size_mb(args.out / 'model'):.1f} MB ({kinds}), {n} files, "
          f"{total:.1f} MB in all", file=sys.stderr)  # fmt: skip
    if total > 60:
        print(f"pack is {total:.1f} MB, over the 60 MB budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
