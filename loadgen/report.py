"""Run output: summary.csv, summary.json, records.csv, PNG plots and a self-contained
report.html (plots embedded as base64), plus the Markdown table printed at the end.

The plots are the ones a card is chosen from: latency percentiles against the throughput
*achieved* (the hockey stick), throughput per level (offered vs achieved in open loop), the
latency CDF per level, where the server spent the time per level (prepare / queue / encode /
decode / held up / network), and every request's latency over time within its level (warm-up,
drift). Points carry their sample counts; levels not measured are left out, never drawn as 0.

Plots use matplotlib's Agg backend (no display needed); `line_plots` is shared with
`loadgen.compare`.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgen.plots import pyplot
from loadgen.stats import (
    CSV_COLUMNS,
    FIELDS,
    LOW_SAMPLES,
    SPLIT,
    STREAM_CSV_COLUMNS,
    LevelResult,
    LevelSummary,
)
from loadgen.writers import cell, write_csv, write_json

RECORD_COLUMNS = ["level", "mode", "concurrency", "rate", "phase", *FIELDS]


def write_run(out: Path, meta: dict[str, Any], results: Sequence[LevelResult]) -> dict[str, Path]:
    """Write every output of a run into out; returns the written paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    summaries = [r.summary for r in results]
    columns = summary_columns(summaries)
    paths = {
        "summary.csv": write_csv(out / "summary.csv", columns, [s.to_row() for s in summaries]),
        "summary.json": write_json(
            out / "summary.json", {**meta, "levels": [s.to_dict() for s in summaries]}
        ),
        "records.csv": write_csv(out / "records.csv", RECORD_COLUMNS, _record_rows(results)),
    }
    plots = level_plots(out, results, str(meta.get("label", "")))
    paths.update({p.name: p for p in plots})
    paths["report.html"] = write_html(out / "report.html", run_page(meta, summaries, plots))
    return paths


def is_stream_run(summaries: Sequence[LevelSummary]) -> bool:
    return bool(summaries) and all(s.mode == "stream" for s in summaries)


def summary_columns(summaries: Sequence[LevelSummary]) -> list[str]:
    return STREAM_CSV_COLUMNS if is_stream_run(summaries) else CSV_COLUMNS


def _record_rows(results: Sequence[LevelResult]) -> Iterable[dict[str, Any]]:
    for result in results:
        plan = result.plan
        level = {
            "level": plan.index,
            "mode": plan.mode,
            "concurrency": plan.concurrency or plan.streams,
        }
        for record in sorted(result.records, key=lambda r: r.sent_ts):
            yield {
                **level,
                "rate": plan.rate,
                "phase": result.phase(record),
                **record.__dict__,
            }


TABLE = [
    ("mode", "mode"),
    ("level", "c / rate"),
    ("samples", "n"),
    ("errors", "errors"),
    ("rps", "goodput req/s"),
    ("audio_s_per_s", "RTFx"),
    ("p50_ms", "p50 ms"),
    ("p90_ms", "p90 ms"),
    ("p99_ms", "p99 ms"),
    ("p99_ci_ms", "p99 95% CI ms"),
    ("wer", "WER"),
    ("wait_p50_ms", "queue p50 ms"),
    ("encode_p50_ms", "encode p50 ms"),
    ("decode_p50_ms", "decode p50 ms"),
    ("held_p50_ms", "held p50 ms"),
    ("status", "status"),
]
"""The terminal's table (and the report's first one): the columns a card is chosen by."""
STREAM_TABLE = [
    ("mode", "mode"),
    ("level", "streams"),
    ("samples", "n"),
    ("errors", "errors"),
    ("first_interim_p50_ms", "first interim p50 ms"),
    ("first_interim_p99_ms", "first interim p99 ms"),
    ("interim_p50_ms", "interim p50 ms"),
    ("interim_p99_ms", "interim p99 ms"),
    ("final_lag_p50_ms", "final lag p50 ms"),
    ("final_lag_p90_ms", "final lag p90 ms"),
    ("p99_ms", "final lag p99 ms"),
    ("final_lag_max_ms", "final lag max ms"),
    ("wer", "WER"),
    ("flicker_words", "flicker words"),
    ("behind_streams", "behind"),
    ("audio_s_per_s", "RTFx"),
    ("status", "status"),
]
"""The table of a stream run (p99_ms is the final lag's, so it is marked like a p99)."""
DIGITS = {"wer": 3, "rps": 2, "audio_s_per_s": 2, "batch_size_mean": 1, "flicker_words": 2}


def status(s: LevelSummary) -> str:
    """What qualifies a level's figures, in a word or three."""
    if not s.measured:
        return "NOT MEASURED"
    words = []
    if s.saturated:
        words.append("SATURATED")
    if s.stable is not None:
        words.append("stable" if s.stable else "NOT stable")
    return ", ".join(words) or "ok"


def _interval(lo_hi: tuple[float, float]) -> str:
    lo, hi = lo_hi
    return "-" if math.isnan(lo) or math.isnan(hi) else f"{lo:.0f}-{hi:.0f}"


def _table_values(s: LevelSummary) -> dict[str, Any]:
    values = {
        **s.to_row(),
        "level": f"{_x(s):g}",
        "status": status(s),
        "p99_ci_ms": _interval(s.p99_ci_ms),
    }
    if s.offered_rps:
        values["level"] = f"{s.offered_rps:g}/s"
    return values


def _table_row(s: LevelSummary, keys: Sequence[str]) -> list[str]:
    values = _table_values(s)
    out = []
    for key in keys:
        value = values.get(key)
        if not s.measured and key not in ("mode", "level", "status", "errors"):
            out.append("-")
            continue
        if isinstance(value, float) and not math.isnan(value):
            value = f"{value:.{DIGITS.get(key, 0)}f}"
            if key == "p99_ms" and s.p99_low_samples:
                value += "*"
        out.append(cell(value) or "-")
    return out


def table_spec(summaries: Sequence[LevelSummary]) -> list[tuple[str, str]]:
    return STREAM_TABLE if is_stream_run(summaries) else TABLE


def markdown_table(summaries: Sequence[LevelSummary]) -> str:
    spec = table_spec(summaries)
    header = [title for _, title in spec]
    keys = [key for key, _ in spec]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_table_row(s, keys)) + " |" for s in summaries]
    if any(s.measured and s.p99_low_samples for s in summaries):
        lines.append(f"\n\\* p99 of fewer than {LOW_SAMPLES} samples (n): about the largest value.")
    return "\n".join(lines)


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]
    notes: list[str] | None = None
    """Text beside each point (its level, sample count, errors)."""
    style: str = "o-"


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
    """A horizontal reference line (an SLO), drawn dashed and labelled `hline_label`."""
    hline_label: str = ""
    vline: float | None = None
    """A vertical reference line (the SLO on a cost-vs-SLO plot)."""
    x_zero: bool = False
    """Start the x axis at 0 (ratios between points matter)."""
    integer_x: bool = False
    """Ticks at the levels themselves (concurrency is an integer)."""


def line_plots(path: Path, panels: Sequence[Panel], title: str = "") -> Path:
    """One PNG with the panels side by side; y axes start at 0."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        _draw(ax, panel.series)
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.grid(True, alpha=0.3)
        xs = [x for s in panel.series for x in s.xs if not math.isnan(x)]
        if panel.integer_x:
            _level_axis(ax, xs)
        ax.margins(y=0.12)  # room for the point labels under the title
        if panel.hline is not None:
            ax.axhline(
                panel.hline,
                color="red",
                linestyle=":",
                label=panel.hline_label or f"{panel.hline:g}",
            )
        if panel.vline is not None:
            ax.axvline(panel.vline, color="red", linestyle=":", label=f"SLO {panel.vline:g} ms")
        ax.set_ylim(bottom=0)
        if panel.x_zero:
            ax.set_xlim(left=0)
        handles, labels = ax.get_legend_handles_labels()
        if panel.right:
            twin = ax.twinx()
            _draw(twin, panel.right, "s--")
            twin.set_ylabel(panel.right_ylabel)
            twin.set_ylim(bottom=0)
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


def _level_axis(ax: Any, xs: Sequence[float]) -> None:
    """Ticks at the levels; sweeps usually double (1, 2, 4, 8...): a log2 axis spaces them
    evenly."""
    if not xs:
        return
    from matplotlib.ticker import FuncFormatter, NullFormatter

    if min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(xs)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _draw(ax: Any, series: Sequence[Series], style: str | None = None) -> None:
    for s in series:
        notes = s.notes or [""] * len(s.xs)
        points = [
            (x, y, n)
            for x, y, n in zip(s.xs, s.ys, notes, strict=True)
            if not (math.isnan(x) or math.isnan(y))
        ]
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], style or s.style, label=s.label)
        for x, y, note in points:
            if note:
                ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)


def _x(s: LevelSummary) -> float:
    if s.mode == "stream":
        return float(s.streams or 0)
    value = s.concurrency if s.mode == "closed" else s.rate
    return float(value or 0)


XLABEL = {
    "closed": "concurrency (requests in flight)",
    "open": "offered rate (requests/s)",
    "stream": "concurrent live streams",
}
LETTER = {"closed": "c", "open": "r", "stream": "s"}


def _point_note(s: LevelSummary) -> str:
    note = f"{LETTER[s.mode]}={_x(s):g} n={s.samples}"
    if s.errors:
        note += f" err={s.errors}"
    if s.saturated:
        note += " SAT"
    return note


def level_plots(out: Path, results: Sequence[LevelResult], label: str) -> list[Path]:
    """latency.png, throughput.png, cdf.png, breakdown.png and timeseries.png: one panel per
    loop mode in the run."""
    summaries = [r.summary for r in results]
    if is_stream_run(summaries):
        return stream_plots(out, results, label)
    modes = [m for m in ("closed", "open") if any(s.mode == m for s in summaries)]
    if not modes:
        return []
    latency, throughput = [], []
    for mode in modes:
        rows = sorted((s for s in summaries if s.mode == mode and s.measured), key=_x)
        rtfx = [s.audio_s_per_s for s in rows]
        latency.append(
            Panel(
                f"latency vs throughput achieved, {mode} loop",
                "RTFx achieved (audio seconds per second)",
                "latency (ms)",
                [
                    Series(q, rtfx, [getattr(s, f"{q}_ms") for s in rows], notes)
                    for q, notes in (
                        ("p50", None),
                        ("p90", None),
                        ("p99", [_point_note(s) for s in rows]),
                    )
                ],
                x_zero=True,
            )
        )
        xs = [_x(s) for s in rows]
        offered = [Series("offered req/s", xs, xs, style="k+:")] if mode == "open" else []
        throughput.append(
            Panel(
                f"throughput achieved, {mode} loop",
                XLABEL[mode],
                "goodput (successful requests/s)",
                [
                    Series(
                        "goodput req/s", xs, [s.rps for s in rows], [_point_note(s) for s in rows]
                    ),
                    *offered,
                ],
                [Series("RTFx (audio s/s)", xs, rtfx)],
                "audio seconds per second (RTFx)",
                integer_x=True,
            )
        )
    return [
        line_plots(out / "latency.png", latency, label),
        line_plots(out / "throughput.png", throughput, label),
        cdf_plot(out / "cdf.png", results, modes, label),
        breakdown_plot(out / "breakdown.png", summaries, modes, label),
        timeseries_plot(out / "timeseries.png", results, modes, label),
    ]


def stream_plots(out: Path, results: Sequence[LevelResult], label: str) -> list[Path]:
    """stream.png (final lag percentiles, first interim and interim latency against streams),
    then the CDF, where-the-time-went and over-time plots of the final lag."""
    rows = sorted((r.summary for r in results if r.summary.measured), key=_x)
    xs = [_x(s) for s in rows]
    notes = [
        _point_note(s) + (f" behind={s.behind_streams}" if s.behind_streams else "") for s in rows
    ]
    lag = Panel(
        "final lag against streams",
        XLABEL["stream"],
        "final lag (ms)",
        [
            Series("p50", xs, [s.final_lag_p50_ms for s in rows]),
            Series("p90", xs, [s.final_lag_p90_ms for s in rows]),
            Series("p99", xs, [s.final_lag_p99_ms for s in rows], notes),
            Series("max", xs, [s.final_lag_max_ms for s in rows], style="k+:"),
        ],
        integer_x=True,
    )
    interim = Panel(
        "first interim and interim latency against streams",
        XLABEL["stream"],
        "ms",
        [
            Series("first interim p50", xs, [s.first_interim_p50_ms for s in rows]),
            Series("first interim p99", xs, [s.first_interim_p99_ms for s in rows]),
            Series("interim p50", xs, [s.interim_p50_ms for s in rows], style="s--"),
            Series("interim p99", xs, [s.interim_p99_ms for s in rows], style="s--"),
        ],
        integer_x=True,
    )
    summaries = [r.summary for r in results]
    return [
        line_plots(out / "stream.png", [lag, interim], label),
        cdf_plot(out / "cdf.png", results, ["stream"], label),
        breakdown_plot(out / "breakdown.png", summaries, ["stream"], label),
        timeseries_plot(out / "timeseries.png", results, ["stream"], label),
    ]


def cdf_plot(path: Path, results: Sequence[LevelResult], modes: Sequence[str], label: str) -> Path:
    """Latency CDF of each level's window (successful requests), one curve per level."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(modes), figsize=(6.4 * len(modes), 4.4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for result in sorted((r for r in results if r.plan.mode == mode), key=lambda r: r.plan.x):
            xs = sorted(
                r.metric_ms for r in result.records if r.ok and result.phase(r) == "measure"
            )
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=f"{result.plan.describe()} (n={len(xs)})")
        ax.set(
            title=f"latency CDF per level, {_mode_words(mode)}",
            xlabel="final lag (ms)" if mode == "stream" else "latency (ms)",
            ylabel="share of requests",
        )
        ax.set_xlim(left=0)
        ax.set_ylim(0, 1.02)
        ax.axhline(0.99, color="grey", linestyle=":", linewidth=0.8)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="lower right")
    if label:
        fig.suptitle(label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


BREAKDOWN = (*SPLIT, "network")
BREAKDOWN_LABELS = {
    "prepare": "prepare (decode audio, features)",
    "wait": "queue (before joining)",
    "encode": "encode",
    "decode": "decode (own steps)",
    "held": "held up by others' encoder passes",
    "network": "network + client",
}


def breakdown_plot(
    path: Path, summaries: Sequence[LevelSummary], modes: Sequence[str], label: str
) -> Path:
    """Mean latency per level as stacked bars of where the time went; the bars add up to the
    mean client latency (means add up, medians don't). Levels whose server sent no split are
    left empty."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(modes), figsize=(6.4 * len(modes), 4.4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        rows = sorted((s for s in summaries if s.mode == mode and s.measured), key=_x)
        positions = list(range(len(rows)))  # numbers, not level strings: matplotlib frets
        bottom = [0.0] * len(rows)
        for part in BREAKDOWN:
            heights = [_finite(s.split_mean_ms.get(part)) for s in rows]
            ax.bar(positions, heights, bottom=bottom, label=BREAKDOWN_LABELS[part])
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        for x, (top, s) in enumerate(zip(bottom, rows, strict=True)):
            ax.annotate(f"n={s.samples}", (x, top), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(positions, [f"{_x(s):g}" for s in rows])
        ax.set(
            title=f"where the time went (mean), {_mode_words(mode)}",
            xlabel=XLABEL[mode],
            ylabel="final lag (ms)" if mode == "stream" else "ms",
        )
        ax.grid(True, axis="y", alpha=0.3)
        if rows:
            ax.legend(fontsize="x-small", loc="upper left")
    if label:
        fig.suptitle(label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _mode_words(mode: str) -> str:
    return "live streams" if mode == "stream" else f"{mode} loop"


def _finite(value: float | None) -> float:
    return 0.0 if value is None or math.isnan(value) else value


def timeseries_plot(
    path: Path, results: Sequence[LevelResult], modes: Sequence[str], label: str
) -> Path:
    """Every request's latency against its send time since its level began (warm-up,
    window, cool-down), errors as crosses at the bottom: warm-up effects and drift show."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(modes), figsize=(6.4 * len(modes), 4.4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        ours = sorted((r for r in results if r.plan.mode == mode), key=lambda r: r.plan.x)
        for result in ours:
            ok = [r for r in result.records if r.ok]
            line = ax.plot(
                [r.sent_ts - result.begin_ts for r in ok],
                [r.metric_ms for r in ok],
                ".",
                markersize=3,
                label=result.plan.describe(),
            )
            failed = [r for r in result.records if not r.ok and r.status != "DROPPED"]
            if failed:
                ax.plot([r.sent_ts - result.begin_ts for r in failed], [0.0] * len(failed), "x",
                        color=line[0].get_color())  # fmt: skip
        if ours:
            first = ours[0]
            ax.axvspan(
                0, first.first_window_ts - first.begin_ts, color="grey", alpha=0.15, label="warm-up"
            )
        ax.set(title=f"latency over time within each level, {_mode_words(mode)}",
               xlabel="send time since the level began (s)",
               ylabel="final lag (ms)" if mode == "stream" else "latency (ms)")  # fmt: skip
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    if label:
        fig.suptitle(label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def html_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], css_class: str = "") -> str:
    """A table; no header row when every column title is empty."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns) if any(columns) else ""
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    attr = f" class='{css_class}'" if css_class else ""
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table{attr}>{thead}<tbody>{body}</tbody></table>"


def html_image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1240px}"
    "table{border-collapse:collapse;margin:0.6em 0;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}"
    "th{background:#f4f4f4;white-space:normal;vertical-align:bottom;max-width:5.5em}"
    "td:first-child,th:first-child{text-align:left}"
    "table.meta td{text-align:left;white-space:normal}table.meta td:first-child{font-weight:600}"
    "details{margin:0.6em 0}details>div{overflow-x:auto}"
    ".warn{background:#fff3cd;border:1px solid #e0c060;padding:0.4em 1em}"
    ".note{color:#555;font-size:13px}"
    "img{max-width:100%;display:block;margin:1em 0}"
)


def write_html(path: Path, body: str, title: str = "whisper-grpc load test") -> Path:
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<meta name='viewport' content='width=device-width'>"
        f"<style>{_STYLE}</style></head><body>{body}</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path


def run_facts(meta: dict[str, Any]) -> list[tuple[str, Any]]:
    """The run's metadata, for the top of the report: what was measured, on what, how."""
    info = meta.get("server_info") or {}
    dataset = meta.get("dataset") or {}
    settings = meta.get("settings") or {}
    batching = f"engine {info.get('engine') or 'generate'}"
    if info.get("max_active"):
        batching += f", max_active {info['max_active']}"
    batching += (
        f", max_batch_size {info.get('max_batch_size')}, max_wait_ms {info.get('max_wait_ms')},"
        f" max_queue_size {info.get('max_queue_size')}"
    )
    load = ""
    if settings:
        load = (
            f"window {settings.get('duration_s')} s"
            + (" (--stability)" if settings.get("stability") else "")
            + f", warm-up {settings.get('warmup_s')} s, timeout {settings.get('timeout_s')} s,"
            f" seed {settings.get('seed')}, limit {settings.get('limit') or 'all files'}"
        )
        if meta.get("mode") == "stream":
            load += (
                f"; streams paced {settings.get('pace')}x real time in "
                f"{settings.get('chunk_ms')} ms chunks, {settings.get('utterances')} file(s) per "
                f"stream ({settings.get('gap_ms')} ms apart), behind beyond "
                f"{settings.get('behind_ms')} ms"
            )
    return [
        (
            "target",
            f"{meta.get('target', '')} ({meta.get('mode', '')}, api {meta.get('api', 'asr')})",
        ),
        ("GPU / device", f"{info.get('device_name', '')} ({info.get('device', '')})"),
        ("model, dtype", f"{info.get('model_id', '')}, {info.get('dtype', '')}"),
        ("batching", batching),
        (
            "data set",
            f"{dataset.get('spec')}: {dataset.get('files')} files, {dataset.get('audio_s')} s "
            f"of audio (fingerprint {dataset.get('fingerprint')})",
        ),
        ("load", load),
        (
            "price",
            f"${meta['price_per_hour']}/h" if meta.get("price_per_hour") is not None else "-",
        ),
        (
            "versions",
            f"loadgen {meta.get('loadgen_version', '')}, server {info.get('server_version', '')}, "
            f"torch {info.get('torch_version', '')}",
        ),
        ("started", meta.get("started_at")),
    ]


def _capacity_html(meta: dict[str, Any]) -> str:
    capacity = meta.get("capacity")
    if not capacity:
        return ""
    tried = ", ".join(
        f"{t['level']:g} ({'meets' if t['meets_slo'] else 'fails'})" for t in capacity["tried"]
    )
    found = capacity.get("capacity")
    head = "none of the levels tried" if found is None else f"{found:g}"
    return (
        f"<h2>Capacity</h2><p>{capacity['slo']} at most {capacity['slo_ms']:g} ms: "
        f"<b>{html.escape(head)}</b> ({capacity['mode']}); probed {html.escape(tried)}</p>"
    )


def run_page(meta: dict[str, Any], summaries: Sequence[LevelSummary], plots: Sequence[Path]) -> str:
    spec = table_spec(summaries)
    keys = [key for key, _ in spec]
    price = meta.get("price_per_hour")
    headers = [title for _, title in spec]
    rows = [_table_row(s, keys) for s in summaries]
    if price is not None and is_stream_run(summaries):
        headers.insert(2, "$/1000 stream h")
        for row, s in zip(rows, summaries, strict=True):
            row.insert(2, f"{price * 1000 / s.streams:,.2f}" if s.streams else "-")
    elif price is not None:
        headers.insert(6, "$/1000 audio h")
        for row, s in zip(rows, summaries, strict=True):
            ok = s.measured and s.audio_s_per_s > 0
            row.insert(6, f"{price * 1000 / s.audio_s_per_s:,.2f}" if ok else "-")
    notes = (
        "goodput: responses that came back in the window, per second; RTFx: audio seconds "
        "transcribed per second; n: successful requests sent in the window (every percentile "
        f"is of n); * p99 of fewer than {LOW_SAMPLES} samples; queue/encode/decode/held: the "
        "server's own timing (medians); SATURATED: an open-loop level whose offered load did "
        "not come back, never a peak."
    )
    if is_stream_run(summaries):
        notes = (
            "live streams paced in real time (see load); first interim: from an utterance's "
            "first chunk sent to its first interim result; interim and final lag: a result's "
            "arrival minus the send time of the newest chunk it reflects (Riva's method); n: "
            "utterances sent in the window that got their final; flicker: words retracted "
            "between consecutive interims, per utterance; behind: streams whose chunks went "
            "out later than real time allows."
        )
    columns = summary_columns(summaries)
    everything = [[s.to_row().get(c) for c in columns] for s in summaries]
    return (
        f"<h1>Load test: {html.escape(str(meta.get('label', '')))}</h1>"
        + html_table(["", ""], run_facts(meta), "meta")
        + "<h2>Levels</h2>"
        + html_table(headers, rows)
        + f"<p class='note'>{html.escape(notes)}</p>"
        + _capacity_html(meta)
        + "<details><summary>every column (summary.csv)</summary><div>"
        + html_table(columns, everything)
        + "</div></details>"
        + "<h2>Plots</h2>"
        + "".join(html_image(p) for p in plots)
    )
