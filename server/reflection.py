"""Server reflection under both names clients ask for: `grpc.reflection.v1alpha` (what
grpcio-reflection ships) and `grpc.reflection.v1` (what newer grpcurl and Postman try first).

The two protocols are the same messages, field for field, under two package names, so the v1
method is the v1alpha servicer behind v1's method path: its bytes parse as v1alpha messages.
v1's descriptor is v1alpha's renamed, registered once, so that v1 can describe itself too.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def _register_v1_descriptor() -> None:
    with contextlib.suppress(ImportError):  # a grpcio-reflection that ships v1 registers its own
        importlib.import_module("grpc_reflection.v1.reflection_pb2")
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)
        return  # a newer grpcio-reflection (or anyone else) registered it already
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    for message in proto.message_type:
        for f in message.field:
            if f.type_name:  # message-typed fields only: setting "" would mark it present
                f.type_name = f.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    proto.name, proto.package = V1_FILE, new.strip(".")
    proto.ClearField("options")  # v1alpha's go/java packages and deprecation are not v1's
    pool.Add(proto)


def enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Reflection v1alpha and v1 over `service_names`, listing both reflection services."""
    _register_v1_descriptor()
    names = (*service_names, reflection.SERVICE_NAME, V1_SERVICE)
    reflection.enable_server_reflection(names, server)
    servicer = reflection.aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": handler}),)
    )
