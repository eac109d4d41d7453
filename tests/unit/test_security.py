"""TLS, mutual TLS, bearer tokens and per-client caps, end to end through a real server on
loopback (fake model) with a throwaway CA; the health probe and the load generator's channels
speak all of it."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr.v1 import asr_pb2, asr_pb2_grpc
from server.config import Settings, SettingsError
from server.embedded import EmbeddedServer
from server.healthcheck import Tls, check
from server.models.fake import FakeModel
from tests.conftest import tone, wav_bytes
from tests.pki import CA

TOKENS = ("first-secret-token", "second-secret-token")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, other = CA(folder, "test CA"), CA(folder, "other CA")
    return {
        "ca": ca,
        "other": other,
        "server": ca.issue("server", "localhost", server=True),
        "client": ca.issue("client", "client-1", server=False),
        "stranger": other.issue("stranger", "client-2", server=False),
    }


def serve(settings: Settings) -> EmbeddedServer:
    return EmbeddedServer(settings, FakeModel()).start()


def secure(server: EmbeddedServer, roots: bytes, pair=None) -> grpc.Channel:
    key = pair.key.read_bytes() if pair else None
    cert = pair.cert.read_bytes() if pair else None
    credentials = grpc.ssl_channel_credentials(roots, key, cert)
    return grpc.secure_channel(f"localhost:{server.handle.port}", credentials)


def info(channel: grpc.Channel, metadata=None) -> asr_pb2.ServerInfo:
    return asr_pb2_grpc.SpeechStub(channel).GetServerInfo(
        asr_pb2.GetServerInfoRequest(), timeout=10, metadata=metadata
    )


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        fn()
    return raised.value.code()


def test_tls_serves_only_clients_that_trust_its_certificate(pki):
    server = serve(Settings(tls_cert=pki["server"].cert, tls_key=pki["server"].key))
    try:
        assert info(secure(server, pki["ca"].pem.read_bytes())).model_id == "fake"
        assert code_of(lambda: info(server.channel())) == grpc.StatusCode.UNAVAILABLE
        assert code_of(lambda: info(secure(server, pki["other"].pem.read_bytes()))) == (
            grpc.StatusCode.UNAVAILABLE
        )
        tls = Tls(ca_pem=pki["ca"].pem.read_bytes(), server_name="localhost")
        assert check(f"127.0.0.1:{server.handle.port}", "asr.v1.Speech", 10, tls)[0]
    finally:
        server.stop()


def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(pki):
    ca = pki["ca"].pem.read_bytes()
    server = serve(
        Settings(
            tls_cert=pki["server"].cert, tls_key=pki["server"].key, tls_client_ca=pki["ca"].pem
        )
    )
    try:
        assert info(secure(server, ca, pki["client"])).model_id == "fake"
        assert code_of(lambda: info(secure(server, ca))) == grpc.StatusCode.UNAVAILABLE
        assert code_of(lambda: info(secure(server, ca, pki["stranger"]))) == (
            grpc.StatusCode.UNAVAILABLE
        )
        client = pki["client"]
        probe = Tls(ca, client.cert.read_bytes(), client.key.read_bytes(), "localhost")
        assert check(f"127.0.0.1:{server.handle.port}", "", 10, probe)[0]
    finally:
        server.stop()


def test_a_renewed_certificate_is_served_without_a_restart(pki, tmp_path):
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(pki["server"].cert, cert)
    shutil.copy(pki["server"].key, key)
    server = serve(Settings(tls_cert=cert, tls_key=key))
    try:
        assert info(secure(server, pki["ca"].pem.read_bytes())).model_id == "fake"
        renewed = pki["other"].issue("renewed", "localhost", server=True)
        shutil.copy(renewed.key, key)
        shutil.copy(renewed.cert, cert)
        # A new connection's handshake picks the files up.
        assert info(secure(server, pki["other"].pem.read_bytes())).model_id == "fake"
    finally:
        server.stop()


@pytest.fixture
def token_server(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# clients\n{TOKENS[0]}\n\n{TOKENS[1]}\n")
    server = serve(Settings(auth_token_file=path, max_streams_per_client=1))
    yield server
    server.stop()


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_tokens_guard_every_speech_rpc_and_leave_health_open(token_server, caplog):
    caplog.set_level(logging.INFO)
    channel = token_server.channel()
    stub = asr_pb2_grpc.SpeechStub(channel)
    audio = asr_pb2.RecognizeRequest(
        audio=asr_pb2.RecognitionAudio(content=wav_bytes(tone(440, 1.0, 16_000), 16_000))
    )
    config = asr_pb2.StreamingRecognitionConfig(
        config=asr_pb2.RecognitionConfig(sample_rate_hertz=16_000)
    )
    stream = [asr_pb2.StreamingRecognizeRequest(streaming_config=config)]
    for metadata in (None, bearer("not-a-token"), [("authorization", TOKENS[0])]):
        assert code_of(lambda m=metadata: info(channel, m)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda m=metadata: stub.Recognize(audio, timeout=10, metadata=m)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            code_of(
                lambda m=metadata: list(
                    stub.StreamingRecognize(iter(stream), timeout=10, metadata=m)
                )
            )
            == grpc.StatusCode.UNAUTHENTICATED
        )
    assert token_server.handle.batcher.depth == 0
    assert info(channel, bearer(TOKENS[1])).model_id == "fake"
    assert stub.Recognize(audio, timeout=10, metadata=bearer(TOKENS[0])).results
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    registry = token_server.handle.metrics.registry
    labels = {"method": "GetServerInfo", "code": "UNAUTHENTICATED"}
    assert registry.get_sample_value("asr_requests_total", labels) == 3
    assert not any(t in caplog.text for t in TOKENS)


def test_streams_are_capped_per_client(token_server):
    stub = token_server.stub()
    release, sent = threading.Event(), threading.Event()
    config = asr_pb2.StreamingRecognitionConfig(
        config=asr_pb2.RecognitionConfig(sample_rate_hertz=16_000)
    )

    def held():
        yield asr_pb2.StreamingRecognizeRequest(streaming_config=config)
        sent.set()
        release.wait(30)

    first = stub.StreamingRecognize(held(), timeout=30, metadata=bearer(TOKENS[0]))
    try:
        assert sent.wait(10)
        token_server.call(lambda h: _until(lambda: h.servicer.streams.active == 1))
        again = iter([asr_pb2.StreamingRecognizeRequest(streaming_config=config)])
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.StreamingRecognize(again, timeout=10, metadata=bearer(TOKENS[0])))
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-streams-per-client" in raised.value.details()
        other = iter([asr_pb2.StreamingRecognizeRequest(streaming_config=config)])
        assert list(stub.StreamingRecognize(other, timeout=10, metadata=bearer(TOKENS[1]))) == []
    finally:
        release.set()
        list(first)


async def _until(predicate) -> None:
    import asyncio

    while not predicate():  # polls the server's own state on its loop  # noqa: ASYNC110
        await asyncio.sleep(0.005)


# The load generator runs gRPC in gevent mode (loadgen.green): in its own process, as in use.
LOADGEN_PROBE = """
import sys
from pathlib import Path
from loadgen.client import make_channels, server_info
from loadgen.config import Connection, bearer_metadata
target, ca, cert, key, tokens = sys.argv[1:]
conn = Connection(target=target, tls=True, ca_pem=Path(ca).read_bytes(),
                  metadata=bearer_metadata(Path(tokens)),
                  client_cert_pem=Path(cert).read_bytes(), client_key_pem=Path(key).read_bytes())
print(server_info(make_channels(conn)[0], conn)["model_id"])
"""


@pytest.mark.slow  # a subprocess
def test_the_load_generator_speaks_mutual_tls_and_tokens(pki, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS[0] + "\n")
    server = serve(
        Settings(
            tls_cert=pki["server"].cert, tls_key=pki["server"].key,
            tls_client_ca=pki["ca"].pem, auth_token_file=tokens,
        )
    )  # fmt: skip
    try:
        args = [f"localhost:{server.handle.port}", pki["ca"].pem, pki["client"].cert,
                pki["client"].key, tokens]  # fmt: skip
        run = subprocess.run(
            [sys.executable, "-c", LOADGEN_PROBE, *map(str, args)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip().splitlines()[-1] == "fake"
    finally:
        server.stop()


@pytest.mark.slow  # a subprocess
@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed")
def test_grpcurl_with_mutual_tls_and_a_token(pki, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS[0] + "\n")
    server = serve(
        Settings(
            tls_cert=pki["server"].cert, tls_key=pki["server"].key,
            tls_client_ca=pki["ca"].pem, auth_token_file=tokens,
        )
    )  # fmt: skip
    try:
        run = subprocess.run(
            ["grpcurl", "-cacert", str(pki["ca"].pem), "-cert", str(pki["client"].cert),
             "-key", str(pki["client"].key), "-H", f"authorization: Bearer {TOKENS[0]}",
             f"localhost:{server.handle.port}", "asr.v1.Speech/GetServerInfo"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert '"modelId": "fake"' in run.stdout
    finally:
        server.stop()


def test_tls_settings_go_together(tmp_path):
    with pytest.raises(SettingsError, match="together"):
        Settings(tls_cert=tmp_path / "a.crt")
    with pytest.raises(SettingsError, match="mutual TLS"):
        Settings(tls_client_ca=tmp_path / "ca.crt")


def test_security_flags_come_from_flags_and_environment(tmp_path):
    from server.cli import parse_settings
    from server.security import server_options

    env = {"WHISPER_GRPC_TLS_CERT": "", "WHISPER_GRPC_AUTH_TOKEN_FILE": str(tmp_path / "t")}
    s = parse_settings(["--max-streams-per-client", "3", "--metrics-host", "127.0.0.1"], env)
    assert s.tls_cert is None  # empty (a compose default) means unset
    assert s.auth_token_file == tmp_path / "t"
    assert (s.max_streams_per_client, s.metrics_bind_host) == (3, "127.0.0.1")
    options = dict(server_options(s))
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.http2.max_ping_strikes"] == 2
    assert options["grpc.max_concurrent_streams"] == 256
    with pytest.raises(SettingsError, match="max_calls_per_client"):
        Settings(max_calls_per_client=-1)


def test_connections_beyond_the_limit_are_refused():
    server = serve(Settings(max_connections=1))
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    try:
        first = grpc.insecure_channel(server.address, options=own_connection)
        assert info(first).model_id == "fake"
        second = grpc.insecure_channel(server.address, options=own_connection)
        assert code_of(lambda: info(second)) == grpc.StatusCode.UNAVAILABLE
        assert info(first).model_id == "fake"  # the open one goes on
    finally:
        server.stop()
