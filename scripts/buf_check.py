"""`buf lint` and `buf breaking` over protos/, offline: `python scripts/buf_check.py`.

buf would fetch googleapis (google/longrunning, which the Google subset imports) from the Buf
Schema Registry; CI has no network. So protoc (grpcio-tools) compiles the .proto files into
an image, with googleapis' files taken from googleapis-common-protos as `make protos` does,
and buf (the `buf-bin` wheel) lints that image with protos/buf.yaml and compares it with the
released contract in buf/released/ (see buf/README.md). Exit status 1 on any finding.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from gen_protos import PROTO_DIR, PROTOS, ROOT, googleapis_include

CONFIG = PROTO_DIR / "buf.yaml"
RELEASED = ROOT / "buf" / "released"


def build_image(proto_root: Path, files: list[str], out: Path) -> Path:
    """A FileDescriptorSet with source info (buf reads it as an image)."""
    from grpc_tools import protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{googleapis_include(Path(tmp))}",
            f"-I{well_known}",
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *(str(proto_root / f) for f in files),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc could not compile {proto_root}")
    return out


def buf_binary() -> str:
    found = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if found is None:
        raise SystemExit("buf not found: `pip install buf-bin` (make install does)")
    return found


def check(proto_root: Path, against: Path) -> int:
    """Lint protos under `proto_root` and compare them with the released ones in `against`;
    returns buf's worst exit status."""
    buf = buf_binary()
    with tempfile.TemporaryDirectory() as tmp:
        current = build_image(proto_root, PROTOS, Path(tmp) / "current.binpb")
        released_files = [str(p.relative_to(against)) for p in sorted(against.rglob("*.proto"))]
        released = build_image(against, released_files, Path(tmp) / "released.binpb")
        # --path: our files only; the image also holds the googleapis and well-known imports.
        scope = ["--path", "asr", "--config", str(CONFIG), "--error-format", "text"]
        lint = subprocess.run([buf, "lint", str(current), *scope], check=False)
        breaking = subprocess.run(
            [buf, "breaking", str(current), "--against", str(released), *scope], check=False
        )
    return max(lint.returncode, breaking.returncode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protos", type=Path, default=PROTO_DIR, help="root of the .proto files")
    parser.add_argument("--against", type=Path, default=RELEASED, help="the released .proto root")
    args = parser.parse_args()
    status = check(args.protos, args.against)
    print("buf lint + breaking: " + ("ok" if status == 0 else "FAILED"), file=sys.stderr)
    raise SystemExit(1 if status else 0)


if __name__ == "__main__":
    main()
