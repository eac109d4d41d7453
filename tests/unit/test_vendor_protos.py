"""Our Google and Riva .proto subsets against the vendors' own client packages: every message,
field, enum value and rpc we declare exists there with the same full name, number, type and
cardinality (what makes the wire compatible).

The vendors' descriptors are read in a subprocess: one process can't load both theirs and ours
(the same full names in one descriptor pool are an error).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

from asr.vendors import google_speech_pb2, riva_asr_pb2, riva_audio_pb2

DUMP = """
import json, sys
from google.protobuf import descriptor_pb2
files = []
from google.cloud.speech_v1.types import cloud_speech
files.append(cloud_speech.RecognizeRequest.pb().DESCRIPTOR.file)
from riva.client.proto import riva_asr_pb2, riva_audio_pb2, riva_common_pb2
files += [riva_asr_pb2.DESCRIPTOR, riva_audio_pb2.DESCRIPTOR, riva_common_pb2.DESCRIPTOR]
out = []
for f in files:
    p = descriptor_pb2.FileDescriptorProto()
    f.CopyToProto(p)
    out.append(p.SerializeToString().hex())
json.dump(out, sys.stdout)
"""


def _flatten(proto: descriptor_pb2.FileDescriptorProto) -> dict[str, tuple]:
    """Full name -> what the wire depends on, for every field, enum value and rpc."""
    out: dict[str, tuple] = {}

    def enum(prefix: str, e: descriptor_pb2.EnumDescriptorProto) -> None:
        for v in e.value:
            out[f"{prefix}.{e.name}.{v.name}"] = ("value", v.number)

    def message(prefix: str, m: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{m.name}"
        out[name] = ("message",)
        for f in m.field:
            out[f"{name}.{f.name}"] = (f.number, f.type, f.label, f.type_name)
        for e in m.enum_type:
            enum(name, e)
        for n in m.nested_type:
            message(name, n)

    for m in proto.message_type:
        message(proto.package, m)
    for e in proto.enum_type:
        enum(proto.package, e)
    for s in proto.service:
        for r in s.method:
            out[f"{proto.package}.{s.name}.{r.name}"] = (
                r.input_type,
                r.output_type,
                r.client_streaming,
                r.server_streaming,
            )
    return out


@pytest.fixture(scope="module")
def theirs() -> dict[str, tuple]:
    done = subprocess.run(
        [sys.executable, "-c", DUMP], capture_output=True, text=True, timeout=120, check=True
    )
    flat: dict[str, tuple] = {}
    for hexed in json.loads(done.stdout):
        flat |= _flatten(descriptor_pb2.FileDescriptorProto.FromString(bytes.fromhex(hexed)))
    return flat


def _ours(descriptor: FileDescriptor) -> dict[str, tuple]:
    proto = descriptor_pb2.FileDescriptorProto()
    descriptor.CopyToProto(proto)
    return _flatten(proto)


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize(
    "descriptor",
    [google_speech_pb2.DESCRIPTOR, riva_asr_pb2.DESCRIPTOR, riva_audio_pb2.DESCRIPTOR],
    ids=["google", "riva_asr", "riva_audio"],
)
def test_every_declaration_matches_the_vendors_own(theirs, descriptor):
    ours = _ours(descriptor)
    # Google's service isn't in its client's descriptor pool (GAPIC builds stubs by path):
    # its rpcs are checked against the transport below.
    ours = {k: v for k, v in ours.items() if not k.startswith("google.cloud.speech.v1.Speech.")}
    missing = sorted(k for k in ours if k not in theirs)
    differ = sorted(k for k in ours if k in theirs and ours[k] != theirs[k])
    assert not missing, missing
    assert not differ, [(k, ours[k], theirs[k]) for k in differ]


def test_google_rpcs_are_the_paths_its_client_calls():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("google.cloud.speech_v1")
    assert spec is not None and spec.origin is not None
    transport = Path(spec.origin).parent / "services" / "speech" / "transports" / "grpc.py"
    source = transport.read_text()
    service = google_speech_pb2.DESCRIPTOR.services_by_name["Speech"]
    for method in service.methods:
        assert f'"/google.cloud.speech.v1.Speech/{method.name}"' in source
