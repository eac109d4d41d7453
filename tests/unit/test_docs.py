"""The manual stays true to the code: the configuration page is what `Settings` says, and every
relative link in README.md and docs/*.md leads to a file (and heading) that exists."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _gen_config_doc():
    spec = importlib.util.spec_from_file_location(
        "gen_config_doc", ROOT / "scripts/gen_config_doc.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_page_is_generated_from_settings():
    gen = _gen_config_doc()
    assert (ROOT / "docs/configuration.md").read_text() == gen.render(), (
        "docs/configuration.md is stale: run `python scripts/gen_config_doc.py` (make docs)"
    )


def test_configuration_page_names_every_setting_with_its_flag_and_variable():
    from server.config import Settings

    page = (ROOT / "docs/configuration.md").read_text()
    for f in dataclasses.fields(Settings):
        flag = f.name.replace("_", "-")
        assert f"`--{flag}`<br>`WHISPER_GRPC_{f.name.upper()}`" in page, f.name


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (links in code are code, not links)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in _prose_lines(page.read_text()):
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            base = slug(m.group(1))
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for line in _prose_lines(page.read_text()):
        line = re.sub(r"`[^`]*`", "", line)  # inline code
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                broken.append(f"{target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{target} (no such heading)")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_link_check_sees_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "a.md").write_text("# Load-test a host\n\n## The `compare` report\n")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#load-test-a-host) [ok](a.md#the-compare-report) [web](https://x.org/y)\n"
        "[gone](c.md) [bad](a.md#nowhere) `[code](d.md)`\n```\n[fenced](e.md)\n```\n"
    )
    assert broken_links(page) == ["c.md (no such file)", "a.md#nowhere (no such heading)"]


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for line in _fenced_lines(readme) + [
        line for p in PAGES[1:] for line in _fenced_lines(p.read_text())
    ]:
        assert not line.startswith("$ "), f"a prompt in a copyable block: {line!r}"


def _fenced_lines(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif fenced:
            lines.append(line)
    return lines
