"""--max-connection-age-s through a real server on loopback: a long-lived client connection is
told to go away (HTTP/2 GOAWAY) after the age, so a client behind a connection balancer comes
back on a new connection (and may land on another replica); a call in flight at that moment
still completes within the grace. The fake model holds the call at a gate; the client's
connectivity callbacks, not a clock, say when the server ended the connection."""

from __future__ import annotations

import threading

import grpc
import pytest

from asr.v1 import asr_pb2, asr_pb2_grpc
from server.cli import parse_settings
from server.config import Settings, SettingsError
from server.embedded import EmbeddedServer
from server.models.fake import FakeModel
from tests.conftest import tone, wav_bytes

AGE_S = 0.3  # short, so the test is quick; gRPC adds up to ±10% jitter


def request() -> asr_pb2.RecognizeRequest:
    audio = wav_bytes(tone(440, 1.0, 16_000), 16_000)
    return asr_pb2.RecognizeRequest(audio=asr_pb2.RecognitionAudio(content=audio))


class Connectivity:
    """Records a channel's connectivity states; `left_ready` is set once the channel was READY
    and then left it: the server closed its connection (no idle timeout can fire while a call
    is in flight)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.states: list[grpc.ChannelConnectivity] = []
        self.left_ready = threading.Event()
        channel.subscribe(self._on_change, try_to_connect=True)

    def _on_change(self, state: grpc.ChannelConnectivity) -> None:
        self.states.append(state)
        if grpc.ChannelConnectivity.READY in self.states and state in (
            grpc.ChannelConnectivity.IDLE,
            grpc.ChannelConnectivity.CONNECTING,
            grpc.ChannelConnectivity.TRANSIENT_FAILURE,
        ):
            self.left_ready.set()


@pytest.fixture
def fake() -> FakeModel:
    return FakeModel()


@pytest.fixture
def served(fake: FakeModel):
    settings = Settings(max_connection_age_s=AGE_S, max_connection_age_grace_s=60)
    server = EmbeddedServer(settings, fake).start()
    yield server
    if fake.gate is not None:
        fake.gate.set()
    server.stop()


def test_connection_is_closed_after_its_age_and_the_call_in_flight_completes(
    served: EmbeddedServer, fake: FakeModel
) -> None:
    channel = served.channel()
    stub = asr_pb2_grpc.SpeechStub(channel)
    connectivity = Connectivity(channel)
    assert stub.Recognize(request(), timeout=30).results  # connected, and the server works
    fake.gate = threading.Event()
    fake.started.clear()
    in_flight = stub.Recognize.future(request(), timeout=60)
    assert fake.started.wait(30), "the call never reached the model"
    # The call is held in the model: only the server's GOAWAY can take the channel off READY.
    assert connectivity.left_ready.wait(30), f"no GOAWAY; states {connectivity.states}"
    assert not in_flight.done()
    fake.gate.set()
    response = in_flight.result()  # the grace lets it finish on the old connection
    assert response.results[0].alternatives[0].transcript.startswith("n=16000")
    # The same channel goes on, over a new connection.
    assert stub.Recognize(request(), timeout=30).results
    channel.close()


def test_connection_age_is_off_by_default_and_bounded() -> None:
    assert Settings().max_connection_age_s == 0
    env = {"WHISPER_GRPC_MAX_CONNECTION_AGE_S": "300"}
    settings = parse_settings(["--max-connection-age-grace-s", "120"], env)
    assert (settings.max_connection_age_s, settings.max_connection_age_grace_s) == (300, 120)
    with pytest.raises(SettingsError, match="max_connection_age_s"):
        Settings(max_connection_age_s=-1)
    with pytest.raises(SettingsError, match="max_connection_age_grace_s"):
        Settings(max_connection_age_grace_s=86_401)
