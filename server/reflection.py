"""Server reflection under both names clients ask for: `grpc.reflection.v1alpha` (what
grpcio-reflection ships) and `grpc.reflection.v1` (what newer grpcurl and Postman try first).

The two protocols are the same messages, field for field, under two package names, so the v1
method is the v1alpha servicer behind v1's method path: its bytes parse as v1alpha messages.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE = "grpc.reflection.v1.ServerReflection"


def enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Reflection v1alpha and v1 over `service_names` (the v1alpha name is listed too; v1's is
    not, as this process has no descriptor for it to describe)."""
    names = (*service_names, reflection.SERVICE_NAME)
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
