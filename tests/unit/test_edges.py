"""The three API edges (asr.v1, Google, Riva) are siblings over the speech core: none imports
another, none reaches for another module's private names, and the core holds no protobuf."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EDGES = {
    "server.servicer": ROOT / "server/servicer.py",
    "server.vendors.google": ROOT / "server/vendors/google.py",
    "server.vendors.riva": ROOT / "server/vendors/riva.py",
}


def _imports(source: str) -> list[tuple[str, str | None]]:
    """(module, name) for each import; name is None for `import module`."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, alias.name) for alias in node.names]
    return found


def _violations(module: str, source: str) -> list[str]:
    bad: list[str] = []
    for imported, name in _imports(source):
        edge = f"{module} imports the edge {imported}"
        if imported in EDGES and imported != module and edge not in bad:
            bad.append(edge)
        if imported.startswith("server") and name is not None and name.startswith("_"):
            bad.append(f"{module} imports the private name {imported}.{name}")
    return bad


@pytest.mark.parametrize("module", sorted(EDGES))
def test_an_edge_imports_no_other_edge_and_no_private_name(module):
    assert _violations(module, EDGES[module].read_text()) == []


def test_the_check_catches_what_the_vendor_edges_once_did():
    # google.py once imported SpeechServicer and its private `_duration` from the asr.v1 edge.
    old = "from server.servicer import SpeechServicer, _duration, audio_chunks\n"
    assert _violations("server.vendors.google", old) == [
        "server.vendors.google imports the edge server.servicer",
        "server.vendors.google imports the private name server.servicer._duration",
    ]
    assert _violations("server.vendors.riva", "import server.vendors.google\n") == [
        "server.vendors.riva imports the edge server.vendors.google"
    ]


def test_no_edge_calls_a_private_method_of_the_core():
    for module, path in EDGES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "core"
                and node.attr.startswith("_")
            ):
                pytest.fail(f"{module} calls core.{node.attr}")


def test_the_speech_core_holds_no_protobuf():
    for imported, _ in _imports((ROOT / "server/speech.py").read_text()):
        assert not imported.startswith(("asr", "google.protobuf")), imported
        assert imported not in EDGES and imported != "server.edge", imported
