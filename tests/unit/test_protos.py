"""The committed stubs in asr/v1/ are exactly what `make protos` makes from protos/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ["asr_pb2.py", "asr_pb2.pyi", "asr_pb2_grpc.py"]


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
    fresh = (tmp_path / "asr" / "v1" / name).read_text()
    committed = (ROOT / "asr" / "v1" / name).read_text()
    assert fresh == committed, f"asr/v1/{name} is stale: run `make protos`"


def test_every_rpc_message_field_and_enum_value_is_commented():
    from google.protobuf import descriptor_pb2

    from asr.v1 import asr_pb2

    proto = descriptor_pb2.FileDescriptorProto()
    asr_pb2.DESCRIPTOR.CopyToProto(proto)
    text = (ROOT / "protos" / "asr" / "v1" / "asr.proto").read_text().splitlines()
    uncommented = []
    for number, line in enumerate(text):
        stripped = line.strip()
        declares = stripped.startswith(("rpc ", "message ", "enum ", "service ")) or (
            stripped.endswith(";") and "=" in stripped and not stripped.startswith(("option", "//"))
        )
        if declares and not text[number - 1].strip().startswith("//"):
            uncommented.append(stripped)
    assert not uncommented, uncommented
    assert [m.name for m in proto.service[0].method] == [
        "Recognize",
        "StreamingRecognize",
        "GetServerInfo",
    ]
