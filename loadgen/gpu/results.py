"""The check's one JSON document, rewritten (atomically) after every row, so a crash or a kill
at any point leaves every row measured before it on disk. Standard library only."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class Results:
    """A dict of sections written to `path` after each change; `failures` lists what went
    wrong (a non-empty list means a non-zero exit)."""

    def __init__(self, path: Path, started: float | None = None) -> None:
        self.path = path
        self.started = time.monotonic() if started is None else started
        self.doc: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "status": "running",
            "failures": [],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def set(self, key: str, value: Any) -> None:
        self.doc[key] = value
        self.write()

    def add_row(self, section: str, row: dict[str, Any]) -> None:
        self.doc.setdefault(section, {}).setdefault("rows", []).append(row)
        self.write()

    def fail(self, what: str) -> None:
        self.doc["failures"].append(what)
        self.write()

    def finish(self) -> int:
        self.doc["status"] = "failed" if self.doc["failures"] else "ok"
        self.write()
        return 1 if self.doc["failures"] else 0

    def write(self) -> None:
        self.doc["wall_s"] = round(time.monotonic() - self.started, 1)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        os.replace(tmp, self.path)
