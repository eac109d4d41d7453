"""Run output: summary.csv, summary.json, records.csv, PNG plots and a self-contained
report.html (plots embedded as base64), plus the Markdown table printed at the end.

Plots use matplotlib's Agg backend (no display needed); `line_plots` is shared with
`loadgen.compare`.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgen.stats import CSV_COLUMNS, FIELDS, LevelResult, LevelSummary

RECORD_COLUMNS = ["level", "mode", "concurrency", "rate", "phase", *FIELDS]


def write_run(out: Path, meta: dict[str, Any], results: Sequence[LevelResult]) -> dict[str, Path]:
    """Write every output of a run into out; returns the written paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    summaries = [r.summary for r in results]
    paths = {
        "summary.csv": write_csv(
            out / "summary.csv", CSV_COLUMNS, [s.to_dict() for s in summaries]
        ),
        "summary.json": write_json(
            out / "summary.json", {**meta, "levels": [s.to_dict() for s in summaries]}
        ),
        "records.csv": write_csv(out / "records.csv", RECORD_COLUMNS, _record_rows(results)),
    }
    plots = level_plots(out, summaries, str(meta.get("label", "")))
    paths.update({p.name: p for p in plots})
    paths["report.html"] = write_html(out / "report.html", run_page(meta, summaries, plots))
    return paths


def _record_rows(results: Sequence[LevelResult]) -> Iterable[dict[str, Any]]:
    for result in results:
        plan = result.plan
        level = {"level": plan.index, "mode": plan.mode, "concurrency": plan.concurrency}
        for record in sorted(result.records, key=lambda r: r.sent_ts):
            yield {
                **level,
                "rate": plan.rate,
                "phase": result.phase(record),
                **record.__dict__,
            }


def cell(value: Any) -> str:
    """One CSV/table cell: numbers rounded, None and NaN empty, dicts as `k:v;k:v`."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if math.isnan(value) else str(round(value, 3))
    if isinstance(value, dict):
        return ";".join(f"{k}:{v}" for k, v in sorted(value.items()))
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


TABLE = [
    ("mode", "mode"),
    ("level", "c / rate"),
    ("requests", "requests"),
    ("errors", "errors"),
    ("rps", "req/s"),
    ("audio_s_per_s", "RTFx"),
    ("p50_ms", "p50 ms"),
    ("p90_ms", "p90 ms"),
    ("p99_ms", "p99 ms"),
    ("max_ms", "max ms"),
    ("wer", "WER"),
    ("queue_p50_ms", "queue p50 ms"),
    ("infer_p50_ms", "infer p50 ms"),
    ("batch_size_mean", "batch"),
]


def _table_row(s: LevelSummary) -> list[str]:
    values = {**s.to_dict(), "level": f"{_x(s):g}"}
    out = []
    for key, _ in TABLE:
        value = values[key]
        if isinstance(value, float) and not math.isnan(value):
            digits = (
                3
                if key == "wer"
                else 2
                if key in ("rps", "audio_s_per_s", "batch_size_mean")
                else 0
            )
            value = f"{value:.{digits}f}"
        out.append(cell(value))
    return out


def markdown_table(summaries: Sequence[LevelSummary]) -> str:
    header = [title for _, title in TABLE]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_table_row(s)) + " |" for s in summaries]
    return "\n".join(lines)


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    right: list[Series] = field(default_factory=list)
    """Series on a second y axis."""
    right_ylabel: str = ""
    hline: float | None = None
    """A horizontal reference line (an SLO), drawn dashed."""


def line_plots(path: Path, panels: Sequence[Panel], title: str = "") -> Path:
    """One PNG with the panels side by side."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        _draw(ax, panel.series, "o-")
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.grid(True, alpha=0.3)
        _doubling_axis(ax, [x for s in panel.series for x in s.xs])
        if panel.hline is not None:
            ax.axhline(panel.hline, color="red", linestyle=":", label=f"{panel.hline:g}")
        handles, labels = ax.get_legend_handles_labels()
        if panel.right:
            twin = ax.twinx()
            _draw(twin, panel.right, "s--")
            twin.set_ylabel(panel.right_ylabel)
            more = twin.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        if handles:
            ax.legend(handles, labels, fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _doubling_axis(ax: Any, xs: Sequence[float]) -> None:
    """Sweeps usually double (1, 2, 4, 8...): a log2 axis spaces them evenly."""
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 8:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(xs)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())


def _draw(ax: Any, series: Sequence[Series], style: str) -> None:
    for s in series:
        points = [(x, y) for x, y in zip(s.xs, s.ys, strict=True) if not math.isnan(y)]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=s.label)


def _x(s: LevelSummary) -> float:
    value = s.concurrency if s.mode == "closed" else s.rate
    return float(value or 0)


XLABEL = {"closed": "concurrency (requests in flight)", "open": "offered rate (requests/s)"}


def level_plots(out: Path, summaries: Sequence[LevelSummary], label: str) -> list[Path]:
    """latency.png (percentiles) and throughput.png (req/s and RTFx) against concurrency or
    rate, one panel per loop mode in the run."""
    modes = [m for m in ("closed", "open") if any(s.mode == m for s in summaries)]
    if not modes:
        return []
    latency, throughput = [], []
    for mode in modes:
        rows = sorted((s for s in summaries if s.mode == mode), key=_x)
        xs = [_x(s) for s in rows]
        latency.append(
            Panel(
                f"latency, {mode} loop",
                XLABEL[mode],
                "latency (ms)",
                [
                    Series(q, xs, [getattr(s, f"{q}_ms") for s in rows])
                    for q in ("p50", "p90", "p95", "p99")
                ],
            )
        )
        throughput.append(
            Panel(
                f"throughput, {mode} loop",
                XLABEL[mode],
                "successful requests/s",
                [Series("req/s", xs, [s.rps for s in rows])],
                [Series("RTFx (audio s/s)", xs, [s.audio_s_per_s for s in rows])],
                "audio seconds per second (RTFx)",
            )
        )
    return [
        line_plots(out / "latency.png", latency, label),
        line_plots(out / "throughput.png", throughput, label),
    ]


def html_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}"
    "img{max-width:100%;display:block;margin:1em 0}"
)


def write_html(path: Path, body: str, title: str = "whisper-grpc load test") -> Path:
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{body}</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path


def run_page(meta: dict[str, Any], summaries: Sequence[LevelSummary], plots: Sequence[Path]) -> str:
    info = meta.get("server_info") or {}
    dataset = meta.get("dataset") or {}
    facts = [
        ("label", meta.get("label")),
        ("target", meta.get("target")),
        ("mode", meta.get("mode")),
        ("api", meta.get("api", "asr")),
        ("model", info.get("model_id")),
        (
            "device",
            f"{info.get('device_name', '')} ({info.get('device', '')}, {info.get('dtype', '')})",
        ),
        (
            "batching",
            f"engine {info.get('engine') or 'generate'}"
            + (f", max_active {info['max_active']}" if info.get("max_active") else "")
            + f", max_batch_size {info.get('max_batch_size')}"
            + f", max_wait_ms {info.get('max_wait_ms')}"
            + f", max_queue_size {info.get('max_queue_size')}",
        ),
        (
            "data set",
            f"{dataset.get('spec')}: {dataset.get('files')} files, {dataset.get('audio_s')} s",
        ),
        ("price per hour", meta.get("price_per_hour")),
        ("started", meta.get("started_at")),
        ("loadgen", meta.get("loadgen_version")),
    ]
    columns = list(CSV_COLUMNS)
    rows = [[s.to_dict()[c] for c in columns] for s in summaries]
    return (
        f"<h1>Load test: {html.escape(str(meta.get('label', '')))}</h1>"
        + html_table(["", ""], facts)
        + "<h2>Levels</h2>"
        + html_table(columns, rows)
        + "<h2>Plots</h2>"
        + "".join(html_image(p) for p in plots)
    )
