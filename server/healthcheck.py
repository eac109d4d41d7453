"""`python -m server.healthcheck`: is the server at an address SERVING? For container healthchecks.

It asks the server's standard `grpc.health.v1.Health/Check` (the service `server.app` reports
NOT_SERVING until the model is warm and while draining) and exits 0 when the answer is SERVING,
1 for anything else: NOT_SERVING, an unknown service, no answer (connection refused, name not
resolved) or no answer within the timeout. It prints one line saying what it saw.

With TLS (`--tls`, or the server's own WHISPER_GRPC_TLS_CERT set in the same container) it
trusts `--ca-cert` (default WHISPER_GRPC_HEALTH_CA_CERT, else the server's certificate: right
for a self-signed one) and, for mutual TLS, presents `--client-cert`/`--client-key` (defaults
WHISPER_GRPC_HEALTH_CLIENT_CERT/_KEY). Health needs no bearer token.

Only grpc and the health stubs are imported (no torch, nothing else of the server), so a probe
every few seconds costs a fraction of a second of CPU and never touches the accelerator.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_SERVICE = "asr.v1.Speech"
DEFAULT_TIMEOUT_S = 3.0
PORT_ENV = "WHISPER_GRPC_PORT"
_MAX_DETAIL_CHARS = 300


def default_address(env: Mapping[str, str]) -> str:
    """127.0.0.1 on the port the server reads from the same variable, so a container whose
    port was moved with WHISPER_GRPC_PORT keeps a working healthcheck."""
    return f"127.0.0.1:{env.get(PORT_ENV, '50051')}"


@dataclass(frozen=True)
class Tls:
    """How the probe speaks TLS: PEM contents of the roots and of the client's pair."""

    ca_pem: bytes | None = None
    client_cert_pem: bytes | None = None
    client_key_pem: bytes | None = None
    server_name: str = ""  # the name the certificate is checked against, if not the host's

    @classmethod
    def from_files(cls, ca: str, cert: str, key: str, server_name: str = "") -> Tls:
        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return cls(read(ca), read(cert), read(key), server_name)


def _channel(address: str, tls: Tls | None, options: list[tuple[str, Any]]) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    if tls.server_name:
        options = [*options, ("grpc.ssl_target_name_override", tls.server_name)]
    credentials = grpc.ssl_channel_credentials(tls.ca_pem, tls.client_key_pem, tls.client_cert_pem)
    return grpc.secure_channel(address, credentials, options=options)


def check(address: str, service: str, timeout_s: float, tls: Tls | None = None) -> tuple[bool, str]:
    """Ask `address` once about `service`; (SERVING?, one line saying what was seen)."""
    shown = f"{service!r}" if service else "the server"
    # A probe goes straight to its target: an http_proxy meant for other traffic must not
    # turn "connection refused" into a proxy error or a hang.
    options: list[tuple[str, Any]] = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
    with _channel(address, tls, options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as err:
            return False, _describe_error(err, address, shown, timeout_s)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, (
        f"{status}: {shown} at {address}"
    )


def _describe_error(err: grpc.RpcError, address: str, shown: str, timeout_s: float) -> str:
    code = err.code() if isinstance(err, grpc.Call) else None
    name = code.name if code is not None else "ERROR"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{name}: no answer from {address} within {timeout_s:g} s"
    if code == grpc.StatusCode.NOT_FOUND:
        return f"{name}: the server at {address} does not know {shown}"
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    # gRPC's details can span lines; a healthcheck log wants one.
    flat = " ".join(str(details or "").split())[:_MAX_DETAIL_CHARS]
    return f"{name}: no answer from {address} ({flat})"


def _parse_args(argv: Sequence[str] | None, env: Mapping[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m server.healthcheck",
        description="Exit 0 if a whisper-grpc server reports SERVING on grpc.health.v1, else 1.",
    )
    parser.add_argument(
        "--target",
        "--address",  # the old name, kept
        dest="address",
        default=default_address(env),
        help=f"HOST:PORT of the server (default 127.0.0.1:${PORT_ENV} or 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--service",
        default=DEFAULT_SERVICE,
        help=f"health service name; '' asks about the whole server (default {DEFAULT_SERVICE})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT_S:g})",
    )
    tls_env = env.get("WHISPER_GRPC_HEALTH_TLS", "").strip().lower()
    tls_default = (
        tls_env in ("1", "true", "yes", "on") if tls_env else bool(env.get("WHISPER_GRPC_TLS_CERT"))
    )
    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=tls_default,
        help="speak TLS [env WHISPER_GRPC_HEALTH_TLS; unset: on if WHISPER_GRPC_TLS_CERT is]",
    )
    parser.add_argument(
        "--ca-cert",
        default=env.get("WHISPER_GRPC_HEALTH_CA_CERT") or env.get("WHISPER_GRPC_TLS_CERT", ""),
        help="PEM roots to trust (default WHISPER_GRPC_HEALTH_CA_CERT, else the server's cert)",
    )
    parser.add_argument(
        "--client-cert",
        default=env.get("WHISPER_GRPC_HEALTH_CLIENT_CERT", ""),
        help="PEM client certificate, for mutual TLS",
    )
    parser.add_argument(
        "--client-key",
        default=env.get("WHISPER_GRPC_HEALTH_CLIENT_KEY", ""),
        help="PEM key of --client-cert",
    )
    parser.add_argument(
        "--server-name",
        default=env.get("WHISPER_GRPC_HEALTH_SERVER_NAME", ""),
        help="the name to check the server's certificate against (default: the host)",
    )
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error(f"--timeout must be positive, not {args.timeout:g}")
    return args


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    try:
        args = _parse_args(argv, os.environ if env is None else env)
    except SystemExit as exit_:
        # Docker reserves healthcheck exit code 2; a usage error is simply "not healthy".
        return 0 if exit_.code in (0, None) else 1
    try:
        tls = (
            Tls.from_files(args.ca_cert, args.client_cert, args.client_key, args.server_name)
            if args.tls
            else None
        )
    except OSError as err:
        print(f"ERROR: cannot read a TLS file: {err}", file=sys.stderr)
        return 1
    serving, message = check(args.address, args.service, args.timeout, tls)
    print(message, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
