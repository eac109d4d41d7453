"""Generate the Python gRPC stubs in `asr/` from the `.proto` files in `protos/asr/`.

`python scripts/gen_protos.py` rewrites them in place; `--out DIR` writes them elsewhere (the
test that proves the committed stubs match the .proto generates into a temporary folder and
compares). The stubs are committed so that the server and the load generator install without
grpcio-tools; this script is the only way they are made.

The Google and Riva subsets in `asr/vendors/` import `google/longrunning/operations.proto`, which
googleapis-common-protos ships under the file name `operations_proto.proto`; it is copied under
its import name into a temporary include folder (the generated code imports the package's
`google.longrunning.operations_pb2`, which registers that same name).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos"
PROTOS = [
    "asr/v1/asr.proto",
    "asr/vendors/google_speech.proto",
    "asr/vendors/riva_audio.proto",
    "asr/vendors/riva_asr.proto",
]
PACKAGES = ("asr", "asr/v1", "asr/vendors")


def googleapis_include(tmp: Path) -> Path:
    """An include folder with googleapis-common-protos' .proto files under their import names."""
    import google.api  # googleapis-common-protos: the folder holding google/api, google/rpc

    site = Path(next(iter(google.api.__path__))).parent.parent
    for folder in ("api", "rpc"):
        shutil.copytree(site / "google" / folder, tmp / "google" / folder)
    longrunning = tmp / "google" / "longrunning"
    longrunning.mkdir(parents=True)
    shutil.copy(
        site / "google" / "longrunning" / "operations_proto.proto", longrunning / "operations.proto"
    )
    return tmp


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"-I{googleapis_include(Path(tmp))}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *(str(PROTO_DIR / p) for p in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
    for package in PACKAGES:
        init = out_dir / package / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated from protos/; regenerate with `make protos`."""\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo root)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
