"""Settings validation and the flag / environment boundary."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server.cli import parse_settings
from server.config import Settings, SettingsError


def test_defaults_are_valid():
    s = Settings()
    assert s.port == 50051 and s.model == "tiny.en" and s.max_message_bytes == 64 * 1024 * 1024


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_wait_ms": -1}, "max_wait_ms"),
        ({"port": 70000}, "port"),
        ({"device": "tpu"}, "device"),
        ({"dtype": "int4"}, "dtype"),
        ({"max_queue_size": 2, "max_batch_size": 8}, "max_queue_size"),
        ({"device": "cpu", "dtype": "float16"}, "float16 needs a GPU"),
        ({"log_level": "LOUD"}, "log_level"),
        ({"model": " "}, "model"),
        ({"engine": "vllm"}, "engine must be one of continuous, generate"),
        ({"max_active": 0}, "max_active"),
        ({"max_join_share": 0}, "max_join_share"),
    ],
)
def test_invalid_settings_are_named(changes, message):
    with pytest.raises(SettingsError, match=message):
        Settings(**changes)


def test_flags_beat_environment_which_beats_defaults():
    env = {"WHISPER_GRPC_MAX_BATCH_SIZE": "16", "WHISPER_GRPC_PORT": "6000"}
    s = parse_settings(["--port", "7000", "--warmup", "false"], env)
    assert (s.port, s.max_batch_size, s.warmup) == (7000, 16, False)


def test_bad_environment_value_names_the_variable():
    with pytest.raises(SettingsError, match="WHISPER_GRPC_MAX_WAIT_MS"):
        parse_settings([], {"WHISPER_GRPC_MAX_WAIT_MS": "soon"})


@pytest.mark.slow  # a subprocess
def test_cli_exits_non_zero_with_a_message_before_loading_anything():
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--max-batch-size", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "max_batch_size must be between 1 and 256" in proc.stderr
    # Nothing heavy was loaded: the same parse in a fresh interpreter imports no torch.
    probe = (
        "import sys\nfrom server.cli import main\ntry:\n    main(['--max-batch-size', '0'])\n"
        "except SystemExit:\n    pass\nprint('torch' in sys.modules)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert loaded.stdout.strip().splitlines()[-1] == "False", loaded.stdout + loaded.stderr


def test_engine_flag_and_variable():
    assert Settings().engine == "continuous"
    assert parse_settings(["--engine", "generate"], {}).engine == "generate"
    s = parse_settings([], {"WHISPER_GRPC_ENGINE": "generate", "WHISPER_GRPC_MAX_ACTIVE": "64"})
    assert (s.engine, s.max_active) == ("generate", 64)


def test_a_model_without_a_continuous_runtime_gets_the_micro_batcher():
    from concurrent.futures import ThreadPoolExecutor

    from server.batching import build_batcher
    from server.batching.micro import MicroBatcher
    from server.models.fake import FakeModel

    with ThreadPoolExecutor(1) as worker:
        batcher = build_batcher(Settings(engine="continuous"), FakeModel(), worker)
    assert isinstance(batcher, MicroBatcher)
