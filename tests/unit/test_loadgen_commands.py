"""`python -m loadgen`: the in-process commands are listed and imported only when used, a
command whose module is missing says so, and --spawn-server's own flags stay out of the child
`run` it starts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from loadgen import cli


def test_every_command_is_listed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    listed = capsys.readouterr().out
    for command in ("run", "compare", "fetch", "study", "engines", "precision", "soak",
                    "decode", "gpu-pack", "gpu-check"):  # fmt: skip
        assert f"    {command} " in listed


def test_locust_side_imports_no_torch() -> None:
    # `run`, `compare` and `fetch` never import the in-process side (torch, transformers).
    tree = ast.parse(Path(cli.__file__).read_text())
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert not any(m and m.startswith(("loadgen.inprocess", "torch", "server")) for m in top)


def test_a_missing_command_module_is_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(cli.PASS_THROUGH, "decode", ("loadgen.not_here_bench", "x"))
    assert cli.main(["decode", "--flag"]) == 2
    assert "loadgen.not_here_bench is not part of this checkout" in capsys.readouterr().err


def test_a_pass_through_command_gets_its_own_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["study", "--help"])
    assert exited.value.code == 0
    assert "python -m loadgen study" in capsys.readouterr().out


def test_spawn_flags_stay_out_of_the_child_run() -> None:
    argv = ["-v", "run", "--spawn-server", "--server-args", "--model base", "--out", "o",
            "--server-args=--dtype float32", "--concurrency", "1"]  # fmt: skip
    assert cli._without_spawn_flags(argv) == ["-v", "run", "--out", "o", "--concurrency", "1"]


def test_spawn_server_refuses_a_target_too(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--spawn-server", "--target", "h:1", "--out", "o"]) == 2
