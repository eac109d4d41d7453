"""`loadgen compare`: several runs (typically one per GPU type) in one table and one set of
plots, with capacity under a latency SLO and the cost of transcribing 1,000 hours of audio.

Runs are compared only when their figures mean the same thing: the same data set
(fingerprint), request mode, model, dtype and load-generator settings (window, warm-up,
sample, deadline, ...). Otherwise `compare` refuses and names the differences; `--force`
compares anyway and prints the differences above the table (and in the report).

Per run and loop mode:

* peak: the measured level with the highest RTFx *achieved* (goodput), open-loop levels
  that saturated excluded (their offered rate never came back);
* SLO capacity (`--slo-p99-ms X`): walking the levels up, those before the first that fails
  (p99 above X, an error, a dropped arrival, saturation or no measurement), and of them the
  one with the highest throughput achieved; a higher level that passes again after a failure
  does not count;
* cost per 1,000 audio hours = price per hour x 1000 / RTFx, at the peak and at the SLO point
  (needs the run's `--price-per-hour`); the cheapest run that meets the SLO is named;
* stream runs (`--streams`): streams per host at `--slo-final-p99-ms` (walking the levels up,
  the highest before the first with a p99 final lag above it, an error or a stream behind
  real time), and cost per 1,000 stream-hours = price per hour x 1000 / streams; the
  cheapest card for live transcription is named next to the cheapest for files.

Unary and stream runs may be compared together (one card's file run and live run, say): each
is checked for comparability against the runs of its own mode.

Runs are labelled by their `--label`, else the GPU (device) name from GetServerInfo.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadgen.costs import cost_per_1000_stream_h, cost_per_1000h
from loadgen.errors import UsageError
from loadgen.report import (
    LOW_SAMPLES,
    XLABEL,
    Panel,
    Series,
    html_image,
    html_table,
    line_plots,
    write_html,
)
from loadgen.writers import write_csv, write_json

SAME_SETTINGS = (
    "duration_s",
    "warmup_s",
    "stability",
    "stability_tolerance",
    "limit",
    "seed",
    "timeout_s",
    "channels",
    "max_inflight",
    "late_ms",
    "generators",
    "pace",
    "chunk_ms",
    "utterances",
    "gap_ms",
    "behind_ms",
    "interim_interval_ms",
)
"""Load-generator settings that change what a figure means; the levels swept may differ."""


class NotComparable(UsageError):
    """Runs whose figures do not mean the same thing; the message lists the differences."""


@dataclass
class Run:
    path: Path
    label: str
    meta: dict[str, Any]
    levels: list[dict[str, Any]]


@dataclass
class Row:
    """One line of the comparison: a run in one loop mode."""

    label: str
    device_name: str
    model: str
    engine: str
    dtype: str
    max_batch_size: int | None
    max_active: int | None
    mode: str
    levels: int
    peak_level: float | None
    peak_rps: float | None
    peak_audio_s_per_s: float | None
    peak_p99_ms: float | None
    slo_level: float | None
    slo_rps: float | None
    slo_audio_s_per_s: float | None
    slo_p99_ms: float | None
    slo_samples: int | None
    """Samples behind the SLO point's p99 (under LOW_SAMPLES: marked)."""
    slo_p99_ci_ms: tuple[float, float] | None
    price_per_hour: float | None
    cost_1000h_peak: float | None
    cost_1000h_slo: float | None
    wer: float | None
    run_dir: str
    cost_1000_stream_h: float | None = None
    """Stream runs: price per hour x 1000 / streams held at the SLO (slo_level)."""


COLUMNS = list(Row.__dataclass_fields__)


def load_run(path: Path, prices: dict[str, float] | None = None) -> Run:
    """A run folder; `prices` (label -> $/h) overrides the price the run was made with."""
    summary = path / "summary.json"
    if not summary.is_file():
        raise FileNotFoundError(f"{path} is not a run folder (no summary.json)")
    meta = json.loads(summary.read_text(encoding="utf-8"))
    info = meta.get("server_info") or {}
    label = str(meta.get("label") or info.get("device_name") or path.name)
    if prices and label in prices:
        meta["price_per_hour"] = prices[label]
    return Run(path, label, meta, list(meta.get("levels", [])))


def comparability(runs: list[Run]) -> list[str]:
    """What differs between runs of the same request mode and makes their figures
    incomparable (empty: nothing). Unary and stream runs answer different questions (files,
    live streams) and sit side by side in their own rows."""
    differences = []
    for mode in dict.fromkeys(str(r.meta.get("mode")) for r in runs):
        differences += _differences([r for r in runs if str(r.meta.get("mode")) == mode], runs)
    return differences


def _differences(runs: list[Run], every: list[Run]) -> list[str]:
    facts: dict[str, list[Any]] = {}
    for run in runs:
        info = run.meta.get("server_info") or {}
        settings = run.meta.get("settings") or {}
        run_facts = {
            "data set (fingerprint)": (run.meta.get("dataset") or {}).get("fingerprint"),
            "request mode": run.meta.get("mode"),
            "model": info.get("model_id"),
            "dtype": info.get("dtype"),
            **{
                f"--{k.removesuffix('_s').replace('_', '-')}": settings.get(k)
                for k in SAME_SETTINGS
            },
        }
        for key, value in run_facts.items():
            facts.setdefault(key, []).append(value)
    unique = {id(r): u.label for r, u in zip(every, _unique_labels(every), strict=True)}
    labels = [unique[id(r)] for r in runs]
    return [
        f"{key} differs: "
        + ", ".join(f"{label}={value}" for label, value in zip(labels, values, strict=True))
        for key, values in facts.items()
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1
    ]


def level_x(level: dict[str, Any]) -> float:
    key = {"closed": "concurrency", "open": "rate", "stream": "streams"}[level["mode"]]
    return float(level[key])


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def measured(level: dict[str, Any]) -> bool:
    """Runs made before `measured` was recorded: measured when it has a p99."""
    return bool(level.get("measured", not math.isnan(_num(level.get("p99_ms")))))


def usable(level: dict[str, Any]) -> bool:
    """A level whose throughput can be quoted: measured and not saturated."""
    return measured(level) and not level.get("saturated")


def peak(levels: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The usable level with the highest RTFx achieved (the lower level on a tie); a level
    from which nothing came back in its window is no peak."""
    candidates = [lv for lv in levels if usable(lv) and _num(lv.get("audio_s_per_s")) > 0]
    return max(candidates, key=lambda lv: (_num(lv["audio_s_per_s"]), -level_x(lv)), default=None)


def meets(level: dict[str, Any], slo_p99_ms: float) -> bool:
    return (
        usable(level)
        and _num(level.get("p99_ms")) <= slo_p99_ms
        and not level.get("errors")
        and not level.get("dropped")
    )


def slo_capacity(levels: list[dict[str, Any]], slo_p99_ms: float) -> dict[str, Any] | None:
    """Walking up the levels, those before the first that fails the SLO; of them the one with
    the highest RTFx achieved (the lower level on a tie: one would not load a card further
    for less). None when the lowest level fails. Capacity is monotonic: a pass above a
    failure is noise, not capacity."""
    passing: list[dict[str, Any]] = []
    for lv in sorted(levels, key=level_x):
        if not meets(lv, slo_p99_ms):
            break
        passing.append(lv)
    return max(passing, key=lambda lv: (_num(lv.get("audio_s_per_s")), -level_x(lv)), default=None)


def meets_stream(level: dict[str, Any], slo_final_p99_ms: float) -> bool:
    """A stream level within the SLO: its p99 final lag (p99_ms) within it, no errors and no
    stream behind real time."""
    return meets(level, slo_final_p99_ms) and not level.get("behind_streams")


def stream_capacity(levels: list[dict[str, Any]], slo_final_p99_ms: float) -> dict[str, Any] | None:
    """Walking up the stream levels, the highest before the first that fails (monotonic, as
    slo_capacity): the streams this host holds within the SLO."""
    held = None
    for lv in sorted(levels, key=level_x):
        if not meets_stream(lv, slo_final_p99_ms):
            break
        held = lv
    return held


def compare_runs(
    runs: list[Run], slo_p99_ms: float | None, slo_final_p99_ms: float | None = None
) -> list[Row]:
    rows = []
    for run in _unique_labels(runs):
        info = run.meta.get("server_info") or {}
        price = run.meta.get("price_per_hour")
        for mode in ("closed", "open", "stream"):
            levels = [lv for lv in run.levels if lv.get("mode") == mode]
            if not levels:
                continue
            top = peak(levels)
            if mode == "stream":
                slo = (
                    stream_capacity(levels, slo_final_p99_ms)
                    if slo_final_p99_ms is not None
                    else None
                )
            else:
                slo = slo_capacity(levels, slo_p99_ms) if slo_p99_ms is not None else None
            rows.append(
                Row(
                    label=run.label,
                    device_name=str(info.get("device_name", "")),
                    model=str(info.get("model_id", "")),
                    engine=str(info.get("engine") or "generate"),
                    dtype=str(info.get("dtype", "")),
                    max_batch_size=info.get("max_batch_size"),
                    max_active=info.get("max_active") or None,
                    mode=mode,
                    levels=len(levels),
                    **_point("peak", top),
                    **_point("slo", slo),
                    slo_samples=slo.get("samples") if slo else None,
                    slo_p99_ci_ms=tuple(slo["p99_ci_ms"]) if slo and slo.get("p99_ci_ms") else None,
                    price_per_hour=price,
                    cost_1000h_peak=cost_per_1000h(price, top["audio_s_per_s"] if top else None),
                    cost_1000h_slo=cost_per_1000h(price, slo["audio_s_per_s"] if slo else None),
                    wer=top.get("wer") if top else None,
                    run_dir=str(run.path),
                    cost_1000_stream_h=cost_per_1000_stream_h(price, level_x(slo))
                    if mode == "stream" and slo
                    else None,
                )
            )
    return rows


def _point(prefix: str, level: dict[str, Any] | None) -> dict[str, float | None]:
    keys = ("rps", "audio_s_per_s", "p99_ms")
    values: dict[str, float | None] = {f"{prefix}_level": level_x(level) if level else None}
    values.update({f"{prefix}_{k}": (level[k] if level else None) for k in keys})
    return values


def _unique_labels(runs: list[Run]) -> list[Run]:
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
    return [
        Run(r.path, f"{r.label} ({r.path.name})", r.meta, r.levels) if seen[r.label] > 1 else r
        for r in runs
    ]


def cheapest(rows: list[Row], mode: str = "closed") -> Row | None:
    """The run that meets the SLO at the lowest cost per 1,000 audio hours (closed, open), or
    per 1,000 stream-hours (stream)."""

    def cost(r: Row) -> float | None:
        return r.cost_1000_stream_h if mode == "stream" else r.cost_1000h_slo

    priced = [r for r in rows if r.mode == mode and cost(r) is not None]
    return min(priced, key=lambda r: cost(r) or 0.0, default=None)


def markdown(
    rows: list[Row], slo_p99_ms: float | None, slo_final_p99_ms: float | None = None
) -> str:
    files = [r for r in rows if r.mode != "stream"]
    live = [r for r in rows if r.mode == "stream"]
    parts = [_files_markdown(files, slo_p99_ms)] if files else []
    if live:
        parts.append(_streams_markdown(live, slo_final_p99_ms))
    return "\n\n".join(parts)


def _streams_markdown(rows: list[Row], slo_final_p99_ms: float | None) -> str:
    slo = f"final p99<={slo_final_p99_ms:g}ms" if slo_final_p99_ms is not None else "SLO"
    header = [
        "run", "engine", "dtype", "batch", "max_active", "mode", f"streams held ({slo})",
        "final lag p99 ms there (n)", "RTFx there", "$/h", "$/1000 stream h", "WER",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        values = [
            r.label, r.engine, r.dtype, r.max_batch_size, r.max_active, r.mode,
            _level(r.slo_level), _p99_cell(r), r.slo_audio_s_per_s, r.price_per_hour,
            r.cost_1000_stream_h, r.wer,
        ]  # fmt: skip
        lines.append("| " + " | ".join(_fmt(v) for v in values) + " |")
    return "\n".join(lines)


def _files_markdown(rows: list[Row], slo_p99_ms: float | None) -> str:
    slo = f"p99<={slo_p99_ms:g}ms" if slo_p99_ms is not None else "SLO"
    header = [
        "run", "engine", "dtype", "batch", "max_active", "mode", "peak at", "peak RTFx",
        f"{slo} at", f"{slo} req/s", f"{slo} RTFx", "p99 ms there (n)", "$/h",
        "$/1000 h (peak)", f"$/1000 h ({slo})", "WER",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        values = [
            r.label, r.engine, r.dtype, r.max_batch_size, r.max_active, r.mode,
            _level(r.peak_level), r.peak_audio_s_per_s, _level(r.slo_level), r.slo_rps,
            r.slo_audio_s_per_s, _p99_cell(r), r.price_per_hour, r.cost_1000h_peak,
            r.cost_1000h_slo, r.wer,
        ]  # fmt: skip
        lines.append("| " + " | ".join(_fmt(v) for v in values) + " |")
    if any(r.slo_samples is not None and r.slo_samples < LOW_SAMPLES for r in rows):
        lines.append(f"\n\\* p99 of fewer than {LOW_SAMPLES} samples: about the largest value.")
    return "\n".join(lines)


def _p99_cell(r: Row) -> str | None:
    if r.slo_p99_ms is None:
        return None
    mark = "*" if r.slo_samples is not None and r.slo_samples < LOW_SAMPLES else ""
    ci = ""
    if r.slo_p99_ci_ms and not any(v is None or math.isnan(v) for v in r.slo_p99_ci_ms):
        ci = f" [{r.slo_p99_ci_ms[0]:.0f}-{r.slo_p99_ci_ms[1]:.0f}]"
    return f"{r.slo_p99_ms:.0f}{mark}{ci} (n={r.slo_samples})"


def _level(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1 else f"{value:,.2f}"
    return str(value)


def compare_plots(
    out: Path, runs: list[Run], slo_p99_ms: float | None, slo_final_p99_ms: float | None = None
) -> list[Path]:
    """compare_latency.png (the hockey stick: p99 against throughput achieved),
    compare_throughput.png (RTFx achieved per level) and, with prices, compare_cost.png (cost
    per 1,000 audio hours against the SLO one would set)."""
    modes = [
        m
        for m in ("closed", "open", "stream")
        if any(lv["mode"] == m for r in runs for lv in r.levels)
    ]
    if not modes:
        return []
    latency, throughput = [], []
    for mode in modes:
        slo_ms = slo_final_p99_ms if mode == "stream" else slo_p99_ms
        slo_label = f"SLO p99 {slo_ms:g} ms" if slo_ms is not None else ""
        p99, rtfx = [], []
        for run in _unique_labels(runs):
            levels = sorted(
                (lv for lv in run.levels if lv["mode"] == mode and measured(lv)), key=level_x
            )
            notes = [_note(lv) for lv in levels]
            p99.append(
                Series(
                    run.label,
                    [_num(lv["audio_s_per_s"]) for lv in levels],
                    [_num(lv["p99_ms"]) for lv in levels],
                    notes,
                )
            )
            rtfx.append(
                Series(
                    run.label,
                    [level_x(lv) for lv in levels],
                    [_num(lv["audio_s_per_s"]) for lv in levels],
                )
            )
        latency.append(
            Panel(
                f"p99 {'final lag' if mode == 'stream' else 'latency'} vs throughput achieved, "
                + ("live streams" if mode == "stream" else f"{mode} loop"),
                "RTFx achieved (audio s per s)",
                "p99 final lag (ms)" if mode == "stream" else "p99 latency (ms)",
                p99,
                hline=slo_ms,
                hline_label=slo_label,
                x_zero=True,
            )
        )
        throughput.append(
            Panel(
                "throughput achieved, " + ("live streams" if mode == "stream" else f"{mode} loop"),
                XLABEL[mode],
                "RTFx (audio s/s)",
                rtfx,
                integer_x=mode != "open",
            )
        )
    plots = [
        line_plots(out / "compare_latency.png", latency),
        line_plots(out / "compare_throughput.png", throughput),
    ]
    cost = _cost_panel(runs, slo_p99_ms)
    if cost is not None:
        plots.append(line_plots(out / "compare_cost.png", [cost]))
    return plots


def _note(level: dict[str, Any]) -> str:
    """Label of a point: its level, samples, errors."""
    x = level_x(level)
    letter = {"closed": "c", "open": "r", "stream": "s"}[level["mode"]]
    note = f"{letter}={x:g} n={level.get('samples', '?')}"
    if level.get("errors"):
        note += f" err={level['errors']}"
    if level.get("saturated"):
        note += " SAT"
    return note


def _cost_panel(runs: list[Run], slo_p99_ms: float | None) -> Panel | None:
    """Closed loop: $ per 1,000 audio hours at the SLO capacity, for every SLO from the
    lowest p99 measured to the highest (a step per level): where a card becomes cheaper."""
    p99s = [
        _num(lv.get("p99_ms"))
        for r in runs
        for lv in r.levels
        if lv["mode"] == "closed" and measured(lv)
    ]
    p99s = [p for p in p99s if not math.isnan(p)]
    priced = [r for r in _unique_labels(runs) if r.meta.get("price_per_hour") is not None]
    if not p99s or not priced:
        return None
    lo, hi = min(p99s), max(p99s) * 1.1
    slos = [lo + (hi - lo) * i / 200 for i in range(201)]
    series = []
    for run in priced:
        levels = [lv for lv in run.levels if lv["mode"] == "closed"]
        ys = []
        for slo in slos:
            point = slo_capacity(levels, slo)
            cost = cost_per_1000h(
                run.meta["price_per_hour"], point["audio_s_per_s"] if point else None
            )
            ys.append(float("nan") if cost is None else cost)
        series.append(Series(run.label, slos, ys, style="-"))
    return Panel(
        "cost at the SLO capacity, closed loop",
        "SLO: p99 latency at most (ms)",
        "$ per 1,000 audio hours",
        series,
        vline=slo_p99_ms,
        x_zero=True,
    )


def write_compare(
    out: Path,
    runs: list[Run],
    slo_p99_ms: float | None,
    force: bool = False,
    slo_final_p99_ms: float | None = None,
) -> tuple[list[Row], str]:
    """All outputs of a comparison; returns the rows and the text printed to the terminal.
    Raises NotComparable when the runs differ in what their figures mean, unless `force`."""
    differences = comparability(runs)
    if differences and not force:
        raise NotComparable(
            "these runs are not comparable:\n  " + "\n  ".join(differences)
            + "\nmake them with the same data set, --mode, model, dtype and load settings, "
            "or pass --force to compare anyway"
        )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    rows = compare_runs(runs, slo_p99_ms, slo_final_p99_ms)
    best = cheapest(rows)
    best_live = cheapest(rows, "stream")
    verdicts = verdict_lines(rows, best, best_live, slo_p99_ms, slo_final_p99_ms)
    warning = (
        "WARNING: compared with --force although:\n" + "\n".join(f"- {d}" for d in differences)
        if differences
        else ""
    )
    text = (warning + "\n\n" if warning else "") + markdown(rows, slo_p99_ms, slo_final_p99_ms)
    if verdicts:
        text += "\n\n" + "\n".join(verdicts)
    write_csv(out / "compare.csv", COLUMNS, (asdict(r) for r in rows))
    write_json(
        out / "compare.json",
        {
            "slo_p99_ms": slo_p99_ms,
            "slo_final_p99_ms": slo_final_p99_ms,
            "differences": differences,
            "cheapest_meeting_slo": asdict(best) if best else None,
            "cheapest_live_meeting_slo": asdict(best_live) if best_live else None,
            "rows": [asdict(r) for r in rows],
        },
    )
    (out / "compare.md").write_text(text + "\n", encoding="utf-8")
    plots = compare_plots(out, runs, slo_p99_ms, slo_final_p99_ms)
    body = (
        "<h1>Load test comparison</h1>"
        + (
            "<div class='warn'><b>Compared with --force although:</b><ul>"
            + "".join(f"<li>{html.escape(d)}</li>" for d in differences)
            + "</ul></div>"
            if differences
            else ""
        )
        + html_table(COLUMNS, ([getattr(r, c) for c in COLUMNS] for r in rows))
        + "".join(f"<p>{html.escape(v)}</p>" for v in verdicts)
        + "".join(html_image(p) for p in plots)
    )
    write_html(out / "report.html", body, "whisper-grpc load test comparison")
    return rows, text


def verdict_lines(
    rows: list[Row],
    best: Row | None,
    best_live: Row | None,
    slo_p99_ms: float | None,
    slo_final_p99_ms: float | None,
) -> list[str]:
    """The cheapest card for files and, with stream runs, the cheapest for live streams."""
    lines = [_verdict(best, slo_p99_ms)] if slo_p99_ms is not None else []
    if slo_final_p99_ms is not None and any(r.mode == "stream" for r in rows):
        if best_live is None:
            lines.append(f"No priced stream run holds a stream within p99 final lag <= "
                         f"{slo_final_p99_ms:g} ms.")  # fmt: skip
        else:
            lines.append(
                f"Cheapest for live streams (p99 final lag <= {slo_final_p99_ms:g} ms): "
                f"{best_live.label}, {best_live.slo_level:g} streams per host, "
                f"${best_live.cost_1000_stream_h:,.2f} per 1,000 stream-hours."
            )
    return lines


def _verdict(best: Row | None, slo_p99_ms: float) -> str:
    if best is None:
        return f"No priced run meets p99 <= {slo_p99_ms:g} ms in closed loop."
    return (
        f"Cheapest meeting p99 <= {slo_p99_ms:g} ms (closed loop): {best.label}, "
        f"${best.cost_1000h_slo:,.2f} per 1,000 audio hours at concurrency "
        f"{best.slo_level:g} ({best.slo_audio_s_per_s:.1f}x real time)."
    )
