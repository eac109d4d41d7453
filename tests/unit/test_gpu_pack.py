"""The first-GPU check is ready on a machine without one: the int8 pack round-trips to a
checkpoint `WhisperModel` loads; the pack carries every distribution the code imports that the
GPU machine lacks (derived from the code, not remembered) at a pinned version; the check stops
with pip's log when the wheels don't install, skips cleanly without CUDA, and imports nothing
but the standard library before its wheels are in place."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from loadgen.gpu import needs, pack
from tests.random_whisper import make_random_checkpoint

ROOT = Path(__file__).resolve().parents[2]
# The pack's wheel list before googleapis-common-protos was found missing on a rehearsal.
WHEELS_BEFORE = ("grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf",
                 "soundfile", "cffi", "pycparser", "soxr")  # fmt: skip


@pytest.fixture(scope="module")
def packed(tiny_en_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    checkpoint = make_random_checkpoint(tiny_en_dir, tmp_path_factory.mktemp("random"))
    out = tmp_path_factory.mktemp("pack")
    (out / "model").mkdir()
    pack.pack_weights(checkpoint, out / "model")
    return checkpoint, out


@pytest.fixture(scope="module")
def derived() -> needs.Needs:
    return needs.derive(carried=pack.CARRIED_ANYWAY)


def test_int8_rows_round_trip_within_their_rounding(packed, tmp_path: Path) -> None:
    checkpoint, out = packed
    original = load_file(str(checkpoint / "model.safetensors"))
    restored = load_file(str(pack.unpack(out / "model", tmp_path / "out") / "model.safetensors"))
    assert set(restored) == set(original)
    manifest = json.loads((out / "model" / pack.MANIFEST).read_text())
    assert "int8-row" in manifest.values()
    for name, kind in manifest.items():
        want, got = original[name].astype(np.float32), restored[name].astype(np.float32)
        assert got.shape == want.shape and restored[name].dtype == np.float16
        if kind == "int8-row":  # half a step of the row's scale, plus fp16 rounding
            step = np.abs(want).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(got - want) <= 0.5 * step + 1e-2 * np.abs(want) + 1e-6), name
    quantized = sum(original[n].nbytes for n, k in manifest.items() if k == "int8-row")
    weights = load_file(str(out / "model" / pack.WEIGHTS))
    assert sum(v.nbytes for k, v in weights.items() if k.endswith(".q")) * 4 == quantized


def test_the_unpacked_checkpoint_loads_and_decodes(packed, tmp_path: Path) -> None:
    from server.models.base import WindowTask
    from server.models.whisper import WhisperModel

    out = pack.unpack(packed[1] / "model", tmp_path / "fp16")
    model = WhisperModel(str(out), "packed", "cpu", "float32", max_new_tokens=4)
    features = model.prepare(np.zeros(16_000, np.float32))
    assert len(model.run_batch([WindowTask(features, 1.0)])[0].tokens) <= 4


def test_the_pack_carries_everything_the_code_imports_that_the_machine_lacks(derived) -> None:
    assert not derived.unresolved, derived.unresolved
    # the Google stubs import google.longrunning: googleapis-common-protos, not on the machine
    assert "googleapis-common-protos" in derived.must_travel
    missing = {d: derived.why(d) for d in derived.must_travel - set(pack.WHEELS)}
    assert not missing, f"add to loadgen.gpu.pack.WHEELS: {missing}"
    pack.check_complete(pack.WHEELS, derived)


def test_the_old_wheel_list_is_refused(derived) -> None:
    with pytest.raises(pack.PackError, match="googleapis-common-protos: imported as google"):
        pack.check_complete(WHEELS_BEFORE, derived)


def test_imports_are_read_from_the_code_with_optional_ones_left_out(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(
        "import os\nfrom google.longrunning import operations_pb2\nimport server.app\n"
        "try:\n    import not_there\nexcept ImportError:\n    pass\n"
        "if TYPE_CHECKING:\n    import typed_only\n"
        "def f():\n    import soxr\n"
    )
    found = needs.imported_modules([tmp_path])
    assert {"google.longrunning", "google.longrunning.operations_pb2", "soxr"} <= set(found)
    assert not {"os", "server.app", "not_there", "typed_only"} & set(found)


def test_every_wheel_has_a_pin_and_a_missing_pin_is_an_error() -> None:
    assert len(pack.wheel_requirements()) == len(pack.WHEELS)
    with pytest.raises(pack.PackError, match=r"no pin in constraints\.txt for not-a-dist"):
        pack.wheel_requirements(("grpcio", "not-a-dist"))


def test_the_machine_list_is_kept_and_read() -> None:
    machine = needs.machine_packages()
    assert {"torch", "transformers", "grpcio", "protobuf", "nvidia-ml-py", "psutil"} <= set(machine)
    assert "googleapis-common-protos" not in machine and "soundfile" not in machine


def test_the_check_imports_only_the_standard_library_before_its_wheels() -> None:
    code = (
        "import sys, loadgen.gpu.check\n"
        "bad = {'grpc', 'google.protobuf', 'torch', 'numpy', 'soundfile'} & set(sys.modules)\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def _check(pack_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadgen.gpu.check", "--pack", str(pack_dir), "--out", str(out),
         *extra], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_wheels_that_dont_install_stop_the_check_with_pips_log(packed, tmp_path: Path) -> None:
    (packed[1] / "wheels").mkdir(exist_ok=True)
    (packed[1] / "wheels" / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    out = tmp_path / "gpu_check.json"
    done = _check(packed[1], out)
    assert done.returncode == 3, done.stderr
    result = json.loads(out.read_text())
    assert result["status"] == "failed" and "did not install" in result["failures"][0]
    assert "broken-1.0" in result["pip"]["log"]


def test_the_check_skips_cleanly_without_cuda(packed, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run for real")
    out = tmp_path / "gpu_check.json"
    done = _check(packed[1], out, "--no-wheels")
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["status"] == "skipped" and "no CUDA device" in result["skipped"]
    env = result["environment"]
    assert env["gpu"]["cuda_available"] is False and env["pack_wheels"]["used"] is False
    assert env["imported"]["grpc"]["version"] and env["cpu"]["cores"]
    assert result["flags"]["levels"] == [1, 8, 32, 64]
