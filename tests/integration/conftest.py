"""Real-weights fixtures: tiny.en converted once per session, served on loopback (port 0)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import Settings
from server.embedded import EmbeddedServer as ServerThread


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def real_settings(model_cache: Path) -> Settings:
    return Settings(
        model="tiny.en",
        # fp32 whatever the CPU: these tests compare tokens with generate's exactly and their
        # thresholds were set in fp32; bf16 has its own test (test_precision_real.py).
        dtype="float32",
        cache_dir=model_cache,
        max_batch_size=8,
        max_wait_ms=20,
        max_queue_size=512,
        warmup=False,
        compile="off",  # minutes of compiling; tests/unit/test_static_step.py covers it
    )


@pytest.fixture(scope="session")
def real_model(real_settings: Settings):
    from server.models.loader import load_model

    return load_model(real_settings)


@pytest.fixture(scope="session")
def real_server(real_settings: Settings, real_model):
    server = ServerThread(real_settings, real_model).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_checkpoint(real_settings: Settings) -> Path:
    from server.checkpoints.provision import resolve_model

    resolved = resolve_model("tiny.en", real_settings.cache_dir)
    assert resolved.local_path is not None
    return resolved.local_path
