"""The committed stubs in asr/ are exactly what `make protos` makes from protos/, and every
declaration in our .proto files has a comment."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ["v1/asr", "vendors/google_speech", "vendors/riva_audio", "vendors/riva_asr"]
GENERATED = [f"{p}{suffix}" for p in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", GENERATED)
def test_committed_stubs_match_the_proto(tmp_path, name):
    _generator().generate(tmp_path)
    fresh = (tmp_path / "asr" / name).read_text()
    committed = (ROOT / "asr" / name).read_text()
    assert fresh == committed, f"asr/{name} is stale: run `make protos`"


@pytest.mark.parametrize("name", PROTOS)
def test_every_rpc_message_field_and_enum_value_is_commented(name):
    text = (ROOT / "protos" / "asr" / f"{name}.proto").read_text().splitlines()
    uncommented = []
    for number, line in enumerate(text):
        stripped = line.strip()
        declares = stripped.startswith(("rpc ", "message ", "enum ", "service ")) or (
            stripped.endswith(";") and "=" in stripped and not stripped.startswith(("option", "//"))
        )
        if declares and not text[number - 1].strip().startswith("//"):
            uncommented.append(stripped)
    assert not uncommented, uncommented


def test_asr_v1_rpcs():
    from google.protobuf import descriptor_pb2

    from asr.v1 import asr_pb2

    proto = descriptor_pb2.FileDescriptorProto()
    asr_pb2.DESCRIPTOR.CopyToProto(proto)
    assert [m.name for m in proto.service[0].method] == [
        "Recognize",
        "StreamingRecognize",
        "GetServerInfo",
    ]
