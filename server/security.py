"""Who may call, over what, and how much: TLS credentials, bearer tokens, per-client caps and
the connection options of the gRPC server. No protobuf, no model.

- TLS (`--tls-cert`, `--tls-key`; `--tls-client-ca` for mutual TLS): the files are read at
  start-up, and again at the next handshake after any of them changes on disk, so a renewed
  certificate is served without a restart (a broken renewal keeps the old one and is logged).
- Tokens (`--auth-token-file`): every `asr.v1` call carries `authorization: Bearer <token>`,
  checked in constant time against every token of the file before any work; health and
  reflection stay open, for probes. Tokens are never logged: a client is named by the line
  number of its token.
- Caps per client (its token, else its address): concurrent calls and streams; beyond them
  RESOURCE_EXHAUSTED, so one client can't take every stream slot of the server.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from server.config import Settings
from server.errors import ClientLimitError, UnauthenticatedError

log = logging.getLogger(__name__)

BEARER = "bearer "


def load_tokens(path: Path) -> tuple[bytes, ...]:
    """The tokens of a file: one per line; blank lines and `#` comments are skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    tokens = tuple(
        line.strip().encode() for line in lines if line.strip() and not line.startswith("#")
    )
    if not tokens:
        raise ValueError(f"{path} holds no tokens (one per line)")
    return tokens


class Access:
    """Admission of one call: its token (if tokens are configured) and its client's caps."""

    def __init__(
        self, tokens: tuple[bytes, ...] = (), max_calls: int = 0, max_streams: int = 0
    ) -> None:
        self.tokens = tokens
        self.max_calls = max_calls
        self.max_streams = max_streams
        self.calls: Counter[str] = Counter()
        self.streams: Counter[str] = Counter()

    @classmethod
    def from_settings(cls, s: Settings) -> Access:
        tokens = load_tokens(s.auth_token_file) if s.auth_token_file is not None else ()
        return cls(tokens, s.max_calls_per_client, s.max_streams_per_client)

    def client(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's name: `token:<line>` with tokens, else its address without the port.
        Raises UnauthenticatedError for a missing or unknown token."""
        if not self.tokens:
            return _peer_host(context.peer())
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode(errors="replace")
        if not header[: len(BEARER)].lower() == BEARER:
            raise UnauthenticatedError(
                "this server needs a token: send metadata 'authorization: Bearer <token>'"
            )
        given = header[len(BEARER) :].strip().encode()
        matched = -1
        for i, token in enumerate(self.tokens):  # every token compared: no early exit
            if hmac.compare_digest(token, given):
                matched = i
        if matched < 0:
            raise UnauthenticatedError("the bearer token is not valid for this server")
        return f"token:{matched + 1}"

    @contextlib.contextmanager
    def admit(self, context: grpc.aio.ServicerContext, stream: bool) -> Iterator[None]:
        """Hold a call (and a stream) slot of the caller for the duration of the call."""
        client = self.client(context)
        if self.max_calls and self.calls[client] >= self.max_calls:
            raise ClientLimitError(
                f"this client has {self.calls[client]} calls open, its cap "
                "(--max-calls-per-client); retry when one ends"
            )
        if stream and self.max_streams and self.streams[client] >= self.max_streams:
            raise ClientLimitError(
                f"this client has {self.streams[client]} streams open, its cap "
                "(--max-streams-per-client); retry when one ends"
            )
        self.calls[client] += 1
        if stream:
            self.streams[client] += 1
        try:
            yield
        finally:
            _release(self.calls, client)
            if stream:
                _release(self.streams, client)


def _release(counts: Counter[str], client: str) -> None:
    counts[client] -= 1
    if counts[client] <= 0:
        del counts[client]  # no entry per client that ever called


def _peer_host(peer: str) -> str:
    """'ipv4:10.0.0.1:5555' -> 'ipv4:10.0.0.1'; 'ipv6:[::1]:5555' -> 'ipv6:[::1]'."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def server_credentials(s: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials of the settings (None: plaintext), re-read when the files change."""
    if s.tls_cert is None or s.tls_key is None:
        return None
    paths = [p for p in (s.tls_cert, s.tls_key, s.tls_client_ca) if p is not None]
    seen = {"stamp": _stamp(paths)}

    def fetch() -> Any:
        stamp = _stamp(paths)
        if stamp == seen["stamp"]:
            return None  # unchanged: gRPC keeps the configuration it has
        try:
            config = _certificate_config(s)
        except (OSError, ValueError) as err:
            log.warning("TLS files changed but could not be read (keeping the old): %s", err)
            return None
        seen["stamp"] = stamp
        log.info("TLS certificate reloaded from %s", s.tls_cert)
        return config

    return grpc.dynamic_ssl_server_credentials(
        _certificate_config(s), fetch, require_client_authentication=s.tls_client_ca is not None
    )


def _certificate_config(s: Settings) -> Any:
    assert s.tls_cert is not None and s.tls_key is not None
    key, chain = s.tls_key.read_bytes(), s.tls_cert.read_bytes()
    if b"PRIVATE KEY" not in key or b"CERTIFICATE" not in chain:
        raise ValueError(f"{s.tls_key} / {s.tls_cert} are not a PEM key and certificate")
    roots = s.tls_client_ca.read_bytes() if s.tls_client_ca is not None else None
    return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)


def _stamp(paths: list[Path]) -> tuple[float, ...]:
    stamps = []
    for p in paths:
        try:
            stamps.append(p.stat().st_mtime)
        except OSError:
            stamps.append(-1.0)
    return tuple(stamps)


def server_options(s: Settings) -> list[tuple[str, Any]]:
    """Channel arguments of the server: message size, keepalive enforcement, limits."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", int(s.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(s.min_ping_interval_s * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_concurrent_streams", s.max_streams_per_connection),
        ("grpc.max_allowed_incoming_connections", s.max_connections),
    ]
    if s.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(s.max_connection_age_grace_s * 1000)),
        ]
    return options
