"""The house's shape, checked from the source (ast, nothing imported): the server package
serves and holds no measuring code, and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("server", "loadgen", "asr")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Modules `path` imports, at any depth (function-level imports count: a cycle through a
    lazy import still ties two modules together), except under `if TYPE_CHECKING:` (names
    for annotations only, never imported at run time)."""
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    package = (
        module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))  # fmt: skip
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    return {name: {m for m in imports(path) if m in modules and m != name}
            for name, path in modules.items()}  # fmt: skip


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_server_imports_no_measuring_code() -> None:
    offenders = {name: sorted(m for m in deps if m.split(".")[0] == "loadgen")
                 for name, deps in _raw_imports("server").items()}  # fmt: skip
    assert {k: v for k, v in offenders.items() if v} == {}
    names = {p.stem for p in (ROOT / "server").rglob("*.py")}
    assert not names & {"bench", "study", "evaluation", "soak"}


def test_scripts_hold_only_repository_chores() -> None:
    chores = sorted(p.name for p in (ROOT / "scripts").glob("*") if p.suffix in (".py", ".sh"))
    assert chores == ["buf_check.py", "gen_config_doc.py", "gen_protos.py"]
    for path in ROOT.glob("*/**/*.py"):
        if path == Path(__file__).resolve():
            continue
        if path.parts[len(ROOT.parts)] in (*PACKAGES, "scripts", "tests"):
            assert "sys.path.insert" not in path.read_text(encoding="utf-8"), path


def _raw_imports(package: str) -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in (ROOT / package).rglob("*.py")}


def test_a_fast_test_that_starts_a_subprocess_fails_naming_itself() -> None:
    import subprocess

    import pytest

    with pytest.raises(AssertionError, match=r"test_layout.py::test_a_fast.*@pytest.mark.slow"):
        subprocess.run(["true"], check=True)
