"""What the GPU check needs that the GPU machine lacks: derived from the code, not remembered.

The check runs the server (`server/`, `asr/`), itself (`loadgen/gpu/`) and the GPU tests
(`tests/gpu/`, `tests/conftest.py`) with the machine's own Python. Every module they import
(read with `ast`, imports under `if TYPE_CHECKING:` and in `try: ... except ImportError` left
out) is mapped to the distribution that provides it in this environment; the distributions the
machine's list (`machine_packages.txt`) lacks must travel as wheels, and so must what those
wheels require in turn (their `Requires-Dist`, markers evaluated for Python 3.12 on Linux).

This runs where the project's environment is installed (pack time, unit tests); the GPU machine
never imports it. Only the standard library and `packaging` are used.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MACHINE_PACKAGES = Path(__file__).with_name("machine_packages.txt")
# What the check imports on the GPU machine, relative to the repository root.
SCANNED = ("server", "asr", "loadgen/gpu", "loadgen/wer.py", "tests/gpu", "tests/conftest.py")
# Modules whose distribution may be absent here (the GPU machine has it; the check uses it
# when present): the module -> distribution map can't be read from this environment.
KNOWN = {"pynvml": "nvidia-ml-py"}
LOCAL = frozenset({"server", "asr", "loadgen", "tests", "scripts", "clients"})
# The GPU machine's interpreter, for evaluating markers (`python_version < "3.13"`...).
MACHINE_MARKERS = {
    "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
    "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
    "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": "",
}  # fmt: skip


def canonical(name: str) -> str:
    """PEP 503 names: `Foo_Bar.baz` and `foo-bar-baz` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def machine_packages(path: Path = MACHINE_PACKAGES) -> dict[str, str | None]:
    """name -> version where the list gives one (`name==version`), else None."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonical(name)] = version or None
    return out


def _optional(node: ast.Try) -> bool:
    """A `try` whose handlers catch ImportError: what it imports may be absent."""
    names: list[str] = []
    for handler in node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names += [k.id for k in kinds if isinstance(k, ast.Name)]
    return bool({"ImportError", "ModuleNotFoundError"} & set(names))


class _Imports(ast.NodeVisitor):
    def __init__(self) -> None:
        self.found: set[str] = set()

    def visit_Import(self, node: ast.Import) -> None:
        self.found.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            # `from google import protobuf` names google.protobuf, not just google
            self.found.update(f"{node.module}.{alias.name}" for alias in node.names)
            self.found.add(node.module)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == (
            "TYPE_CHECKING"
        ):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        if _optional(node):
            for child in node.handlers + node.orelse + node.finalbody:
                self.visit(child)
            return
        self.generic_visit(node)


def imported_modules(paths: Iterable[Path]) -> dict[str, set[Path]]:
    """Dotted module name -> the files importing it (third-party and standard library)."""
    out: dict[str, set[Path]] = {}
    for path in paths:
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            visitor = _Imports()
            visitor.visit(ast.parse(file.read_text(), str(file)))
            for module in visitor.found:
                if module.split(".")[0] not in LOCAL | set(sys.stdlib_module_names):
                    out.setdefault(module, set()).add(file)
    return out


def module_index() -> dict[str, set[str]]:
    """'a' and 'a.b' -> the installed distributions holding files under a/ or a/b/ (a
    namespace package such as `google` is shared; `google.longrunning` is not)."""
    index: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"] or "")
        for file in dist.files or []:
            parts = file.parts
            if not parts or parts[0].endswith((".dist-info", ".data")) or parts[0] == "..":
                continue
            top = parts[0].removesuffix(".py").split(".")[0]
            index.setdefault(top, set()).add(name)
            if len(parts) > 1:
                index.setdefault(f"{top}.{parts[1].removesuffix('.py')}", set()).add(name)
    return index


@dataclass
class Needs:
    """The outcome: which distributions must travel, and why."""

    imported: dict[str, str] = field(default_factory=dict)  # distribution -> a module
    unresolved: dict[str, list[str]] = field(default_factory=dict)  # module -> files
    required_by: dict[str, str] = field(default_factory=dict)  # distribution -> requirer
    must_travel: set[str] = field(default_factory=set)

    def why(self, dist: str) -> str:
        if dist in self.imported:
            return f"imported as {self.imported[dist]}"
        return f"required by {self.required_by.get(dist, '?')}"


def _lookup(module: str, index: dict[str, set[str]]) -> set[str]:
    parts = module.split(".")
    for depth in (2, 1):
        dists = index.get(".".join(parts[:depth]), set())
        if len(dists) == 1 or (dists and depth == 1):
            return dists
    return set()


def _requirements(dist: str) -> list[tuple[str, str]]:
    """(name, specifier) of what `dist` requires on the GPU machine (extras left out)."""
    from packaging.requirements import Requirement

    out = []
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(MACHINE_MARKERS):
            out.append((canonical(req.name), str(req.specifier)))
    return out


def derive(
    root: Path = ROOT,
    machine: dict[str, str | None] | None = None,
    carried: Iterable[str] = (),
) -> Needs:
    """What must travel for the code under `root` on a machine with `machine`'s packages.
    `carried`: distributions the pack takes anyway (newer versions than the machine's), whose
    requirements must then be met too."""
    machine = machine_packages() if machine is None else machine
    index = module_index()
    needs = Needs()
    for module, files in sorted(imported_modules(root / p for p in SCANNED).items()):
        dists = _lookup(module, index) or (
            {KNOWN[module.split(".")[0]]} if module.split(".")[0] in KNOWN else set()
        )
        if not dists:
            needs.unresolved[module] = sorted(str(f.relative_to(root)) for f in files)
        for dist in dists:
            needs.imported.setdefault(dist, module)
    todo = [d for d in needs.imported if d not in machine] + [canonical(c) for c in carried]
    while todo:
        dist = todo.pop()
        if dist in needs.must_travel:
            continue
        needs.must_travel.add(dist)
        for name, specifier in _requirements(dist):
            known = machine.get(name, "absent") if name in machine else "absent"
            # on the machine at a version we can't check against a specifier: carry it too
            if known == "absent" or (specifier and known is None):
                needs.required_by.setdefault(name, f"{dist} ({name}{specifier})")
                todo.append(name)
    return needs


def on_machine(skip: Iterable[str] = ()) -> list[str]:
    """The distributions the code imports that the GPU machine provides itself (a rehearsal
    environment installs these, at any version, besides the machine's torch and transformers)."""
    machine = machine_packages()
    skipped = {canonical(s) for s in skip}
    found = derive(machine=machine).imported
    return sorted(d for d in found if d in machine and d not in skipped)


if __name__ == "__main__":
    # python -m loadgen.gpu.needs [SKIP,...]: what the rehearsal installs of the machine's list
    print(" ".join(on_machine(sys.argv[1].split(",") if len(sys.argv) > 1 else ())))
