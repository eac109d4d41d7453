"""The one writer of measurement outputs: CSV files, JSON files and Markdown tables, shared by
`run`, `compare`, `study` and the in-process benchmarks. Plain Python (no numpy, no torch)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def cell(value: Any) -> str:
    """One CSV/table cell: numbers rounded, None and NaN empty, dicts as `k:v;k:v`."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if math.isnan(value) else str(round(value, 3))
    if isinstance(value, dict):
        return ";".join(f"{k}:{cell(v)}" for k, v in sorted(value.items()))
    if isinstance(value, (tuple, list)):
        return ";".join(cell(v) for v in value)
    return str(value)


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([cell(row.get(c)) for c in columns])
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None  # JSON has no NaN
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(_jsonable(data), indent=2, default=str) + "\n", encoding="utf-8")
    return path


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], first_left: bool = True
) -> str:
    """A Markdown table; the first column left-aligned (a label), the others right-aligned
    (numbers). Cells that are strings are kept as they are; others go through `cell`."""
    align = ["---"] if first_left else ["---:"]
    align += ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(v if isinstance(v, str) else cell(v) for v in row) + " |")
    return "\n".join(lines)
