"""A hub model id fails in seconds, naming the hub and what to use instead, when the hub is
unreachable (server.checkpoints.hub); it used to retry for minutes first."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from server.checkpoints import hub
from server.config import Settings
from server.models.loader import load_model


def test_unreachable_hub_fails_fast_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(hub, "_reachable", lambda endpoint: False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    started = time.monotonic()
    with pytest.raises(hub.HubUnreachableError) as caught:
        load_model(Settings(model="nobody/whisper-not-cached", cache_dir=tmp_path, warmup=False))
    assert time.monotonic() - started < 30  # no retries (the old path took minutes)
    message = str(caught.value)
    assert "'nobody/whisper-not-cached'" in message and "hub" in message
    assert "unreachable" in message and "did not answer" in message
    assert "--model tiny.en" in message and "--model base" in message
    assert "local checkpoint directory" in message


def test_hf_hub_offline_fails_without_probing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def probe(endpoint: str) -> bool:
        raise AssertionError("probed although offline")

    with pytest.raises(hub.HubUnreachableError, match="HF_HUB_OFFLINE is set"):
        hub.ensure_hub_model_available("nobody/whisper-x", ("tiny.en",), probe)


def test_reachable_hub_or_cached_model_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.ensure_hub_model_available("nobody/whisper-x", ("tiny.en",), lambda endpoint: True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_cached", lambda model_id: True)
    hub.ensure_hub_model_available("nobody/whisper-x", ("tiny.en",))  # loads from the cache


def test_probe_reads_the_endpoint_port() -> None:
    # Port 9 on loopback (discard) is closed here: refused at once, so False quickly.
    started = time.monotonic()
    assert hub._reachable("http://127.0.0.1:9", timeout_s=2.0) is False
    assert time.monotonic() - started < 2.5
