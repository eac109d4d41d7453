"""Generate the Python gRPC stubs in `asr/v1/` from `protos/asr/v1/asr.proto`.

`python scripts/gen_protos.py` rewrites them in place; `--out DIR` writes them elsewhere (the
test that proves the committed stubs match the .proto generates into a temporary folder and
compares). The stubs are committed so that the server and the load generator install without
grpcio-tools; this script is the only way they are made.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos"
PROTOS = ["asr/v1/asr.proto"]


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(PROTO_DIR / p) for p in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package in ("asr", "asr/v1"):
        init = out_dir / package / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated from protos/; regenerate with `make protos`."""\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo root)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
