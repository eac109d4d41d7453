"""`buf lint` and `buf breaking` (scripts/buf_check.py, run by `make buf`): clean on the
protos as they are, and a change that would break a released client is caught."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def buf_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "buf_check.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_protos_pass_lint_and_breaking():
    done = buf_check()
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_renumbered_field_is_a_breaking_change(tmp_path):
    protos = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", protos)
    proto = protos / "asr" / "v1" / "asr.proto"
    text = proto.read_text()
    assert "  string model_id = 1;" in text
    proto.write_text(text.replace("  string model_id = 1;", "  string model_id = 90;"))
    done = buf_check("--protos", str(protos))
    assert done.returncode == 1
    assert "model_id" in done.stdout


def test_lint_still_applies_outside_the_exceptions(tmp_path):
    protos = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", protos)
    proto = protos / "asr" / "v1" / "asr.proto"
    proto.write_text(proto.read_text().replace("message WordInfo {", "message word_info {"))
    proto.write_text(proto.read_text().replace("repeated WordInfo", "repeated word_info"))
    done = buf_check("--protos", str(protos))
    assert done.returncode == 1
    assert "word_info" in done.stdout and "PascalCase" in done.stdout
