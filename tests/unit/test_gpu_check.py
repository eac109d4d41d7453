"""The first-GPU check is ready on a machine without one: the int8 pack round-trips to a
checkpoint `WhisperModel` loads, within the rounding of int8 rows, at about a quarter of the
float32 size; `scripts/gpu_check.sh` skips cleanly (exit 0, a "skipped" JSON) without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import LIBRISPEECH, require_data
from tests.random_whisper import make_random_checkpoint

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_pack  # noqa: E402


@pytest.fixture(scope="module")
def packed(tiny_en_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    checkpoint = make_random_checkpoint(tiny_en_dir, tmp_path_factory.mktemp("random"))
    pack = tmp_path_factory.mktemp("pack")
    (pack / "model").mkdir()
    gpu_pack.pack_weights(checkpoint, pack / "model")
    return checkpoint, pack


def test_int8_rows_round_trip_within_their_rounding(packed, tmp_path: Path) -> None:
    checkpoint, pack = packed
    original = load_file(str(checkpoint / "model.safetensors"))
    unpacked = gpu_pack.unpack(pack / "model", tmp_path / "out")
    restored = load_file(str(unpacked / "model.safetensors"))
    assert set(restored) == set(original)
    manifest = json.loads((pack / "model" / gpu_pack.MANIFEST).read_text())
    assert "int8-row" in manifest.values()
    for name, kind in manifest.items():
        want, got = original[name].astype(np.float32), restored[name].astype(np.float32)
        assert got.shape == want.shape and restored[name].dtype == np.float16
        if kind == "int8-row":  # half a step of the row's scale, plus fp16 rounding
            step = np.abs(want).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(got - want) <= 0.5 * step + 1e-2 * np.abs(want) + 1e-6), name
    quantized = sum(original[n].nbytes for n, k in manifest.items() if k == "int8-row")
    weights = load_file(str(pack / "model" / gpu_pack.WEIGHTS))
    int8_bytes = sum(v.nbytes for k, v in weights.items() if k.endswith(".q"))
    assert int8_bytes * 4 == quantized


def test_the_unpacked_checkpoint_loads_and_decodes(packed, tmp_path: Path) -> None:
    from server.models.base import WindowTask
    from server.models.whisper import WhisperModel

    out = gpu_pack.unpack(packed[1] / "model", tmp_path / "fp16")
    model = WhisperModel(str(out), "packed", "cpu", "float32", max_new_tokens=4)
    features = model.prepare(np.zeros(16_000, np.float32))
    assert len(model.run_batch([WindowTask(features, 1.0)])[0].tokens) <= 4


def test_gpu_check_skips_cleanly_without_cuda(packed, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run for real")
    require_data()
    pack = packed[1]
    gpu_pack.pack_audio(LIBRISPEECH, pack / "audio", 2)
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(pack), str(out)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert "no CUDA device" in result["skipped"] and "int8" in result["weights"]
    assert result["environment"]["cuda_available"] is False
