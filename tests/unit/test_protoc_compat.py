"""The contract compiles with every protoc integrators use: the oldest still shipped by Debian
and Ubuntu (3.21, `apt-get install protobuf-compiler`) refuses two fields of one message whose
JSON names differ only in case (JSON transcoders would confuse them too), which newer protoc and
grpcio-tools accept."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from asr.v1 import asr_pb2
from asr.vendors import google_speech_pb2, riva_asr_pb2, riva_audio_pb2
from tests.unit.test_protos import _generator

ROOT = Path(__file__).resolve().parents[2]
COMPILED = [asr_pb2, google_speech_pb2, riva_audio_pb2, riva_asr_pb2]
INT32 = descriptor_pb2.FieldDescriptorProto.TYPE_INT32


def json_name(field: str) -> str:
    """protoc's default JSON name: underscores dropped, the letter after one upper-cased."""
    out: list[str] = []
    upper = False
    for char in field:
        if char == "_":
            upper = True
        else:
            out.append(char.upper() if upper else char)
            upper = False
    return "".join(out)


def _messages(
    messages: list[descriptor_pb2.DescriptorProto], prefix: str
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    for message in messages:
        name = f"{prefix}.{message.name}"
        yield name, message
        yield from _messages(list(message.nested_type), name)


def json_clashes(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """'Message: a, b' for every two fields of one message whose JSON names are equal ignoring
    case."""
    found = []
    for name, message in _messages(list(file.message_type), file.package):
        seen: dict[str, str] = {}
        for field in message.field:
            key = (field.json_name or json_name(field.name)).lower()
            if key in seen:
                found.append(f"{name}: {seen[key]}, {field.name}")
            seen[key] = field.name
    return found


@pytest.mark.parametrize("module", COMPILED, ids=lambda m: m.DESCRIPTOR.name)
def test_no_two_fields_of_a_message_share_a_json_name_ignoring_case(module):
    file = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
    assert len(file.message_type) > 0
    assert json_clashes(file) == []


def test_the_check_finds_the_clash_protoc_3_refuses():
    file = descriptor_pb2.FileDescriptorProto(name="t.proto", package="t", syntax="proto3")
    info = file.message_type.add(name="ServerInfo")
    for number, name in enumerate(["max_streams", "max_beam_size", "max_stream_s"], start=1):
        info.field.add(
            name=name, number=number, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT32
        )
    assert json_clashes(file) == ["t.ServerInfo: max_streams, max_stream_s"]
    assert json_name("max_stream_duration_s") == "maxStreamDurationS"


@pytest.mark.slow  # runs protoc
def test_the_protos_compile_with_the_system_protoc(tmp_path):
    protoc = shutil.which("protoc")
    if protoc is None:
        pytest.skip("no protoc on PATH (Debian/Ubuntu: apt-get install protobuf-compiler)")
    version = subprocess.run([protoc, "--version"], capture_output=True, text=True, check=True)
    gen = _generator()
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as include:
        done = subprocess.run(
            [
                protoc,
                f"-I{gen.PROTO_DIR}",
                f"-I{gen.googleapis_include(Path(include))}",
                f"-I{well_known}",
                f"--descriptor_set_out={tmp_path / 'out.binpb'}",
                *gen.PROTOS,
            ],
            cwd=gen.PROTO_DIR,
            capture_output=True,
            text=True,
            check=False,
        )
    assert done.returncode == 0, f"{version.stdout.strip()}: {done.stderr}"
    assert (tmp_path / "out.binpb").stat().st_size > 0
