"""The OpenMP wait policy is set before torch loads, and an operator's own setting wins
(server.openmp: why the server's worker thread needs it)."""

from __future__ import annotations

import os

import pytest

from server import cli
from server.openmp import WAIT_POLICY, tune_openmp


def test_sets_the_wait_policy_when_the_operator_set_none() -> None:
    env: dict[str, str] = {"PATH": "/bin"}
    line = tune_openmp(env)
    assert env == {"PATH": "/bin", "OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}
    assert "OMP_WAIT_POLICY=ACTIVE" in line and "GOMP_SPINCOUNT=300000" in line


@pytest.mark.parametrize("own", [{"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}])
def test_an_operators_own_setting_wins_and_nothing_is_added(own: dict[str, str]) -> None:
    env = dict(own)
    line = tune_openmp(env)
    assert env == own
    assert "from the environment" in line and next(iter(own)) in line


def test_python_m_server_sets_it_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in WAIT_POLICY:  # set, then deleted: undone after the test, whatever main sets
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    seen: dict[str, str | None] = {}

    def run(coro: object) -> int:
        seen.update({k: os.environ.get(k) for k in WAIT_POLICY})
        coro.close()  # type: ignore[attr-defined]
        return 0

    monkeypatch.setattr(cli.asyncio, "run", run)
    monkeypatch.setattr(cli, "tune_malloc", lambda *a: True)
    assert cli.main(["--port", "0"]) == 0
    assert seen == WAIT_POLICY
