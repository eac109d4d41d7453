"""`loadgen compare`: several runs (typically one per GPU type) in one table and one set of
plots, with capacity under a latency SLO and the cost of transcribing 1,000 hours of audio.

Per run and loop mode:

* peak: the level with the highest RTFx (audio seconds transcribed per second);
* SLO capacity (`--slo-p99-ms X`): the highest concurrency (or rate) whose p99 latency is at
  most X with no errors and no dropped requests, and the throughput there;
* cost per 1,000 audio hours = price per hour x 1000 / RTFx, at the peak and at the SLO point
  (needs the run's `--price-per-hour`); the cheapest run that meets the SLO is named.

Runs are labelled by their `--label`, else the GPU (device) name from GetServerInfo.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadgen.errors import UsageError
from loadgen.report import (
    XLABEL,
    Panel,
    Series,
    html_image,
    html_table,
    line_plots,
    write_csv,
    write_html,
    write_json,
)

AUDIO_HOURS = 1000.0


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
    price_per_hour: float | None
    cost_1000h_peak: float | None
    cost_1000h_slo: float | None
    wer: float | None
    run_dir: str


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


def parse_prices(pairs: list[str]) -> dict[str, float]:
    """['g5.xlarge=1.006', ...] -> {'g5.xlarge': 1.006}."""
    prices = {}
    for pair in pairs:
        label, sep, value = pair.rpartition("=")
        try:
            prices[label] = float(value)
        except ValueError:
            label = ""
        if not sep or not label:
            raise UsageError(f"--price takes LABEL=DOLLARS_PER_HOUR, not {pair!r}")
    return prices


def level_x(level: dict[str, Any]) -> float:
    return float(level["concurrency"] if level["mode"] == "closed" else level["rate"])


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def peak(levels: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The level with the highest RTFx (the lower concurrency on a tie)."""
    usable = [lv for lv in levels if not math.isnan(_num(lv.get("audio_s_per_s")))]
    return max(usable, key=lambda lv: (_num(lv["audio_s_per_s"]), -level_x(lv)), default=None)


def slo_capacity(levels: list[dict[str, Any]], slo_p99_ms: float) -> dict[str, Any] | None:
    """The highest level whose p99 is at most the SLO, with no errors and nothing dropped."""
    meeting = [
        lv
        for lv in levels
        if _num(lv.get("p99_ms")) <= slo_p99_ms and not lv.get("errors") and not lv.get("dropped")
    ]
    return max(meeting, key=level_x, default=None)


def cost_per_1000h(price_per_hour: float | None, audio_s_per_s: float | None) -> float | None:
    """Dollars to transcribe 1,000 hours of audio at this RTFx: it takes 1000/RTFx hours."""
    if price_per_hour is None or not audio_s_per_s or math.isnan(audio_s_per_s):
        return None
    return price_per_hour * AUDIO_HOURS / audio_s_per_s


def compare_runs(runs: list[Run], slo_p99_ms: float | None) -> list[Row]:
    rows = []
    for run in _unique_labels(runs):
        info = run.meta.get("server_info") or {}
        price = run.meta.get("price_per_hour")
        for mode in ("closed", "open"):
            levels = [lv for lv in run.levels if lv.get("mode") == mode]
            if not levels:
                continue
            top = peak(levels)
            slo = slo_capacity(levels, slo_p99_ms) if slo_p99_ms is not None else None
            rows.append(
                Row(
                    label=run.label,
                    device_name=str(info.get("device_name", "")),
                    model=str(info.get("model_id", "")),
                    mode=mode,
                    levels=len(levels),
                    **_point("peak", top),
                    **_point("slo", slo),
                    price_per_hour=price,
                    cost_1000h_peak=cost_per_1000h(price, top["audio_s_per_s"] if top else None),
                    cost_1000h_slo=cost_per_1000h(price, slo["audio_s_per_s"] if slo else None),
                    wer=top.get("wer") if top else None,
                    run_dir=str(run.path),
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
    """The run that meets the SLO at the lowest cost per 1,000 audio hours."""
    priced = [r for r in rows if r.mode == mode and r.cost_1000h_slo is not None]
    return min(priced, key=lambda r: r.cost_1000h_slo or 0.0, default=None)


def markdown(rows: list[Row], slo_p99_ms: float | None) -> str:
    slo = f"p99<={slo_p99_ms:g}ms" if slo_p99_ms is not None else "SLO"
    header = [
        "run", "mode", "peak at", "peak req/s", "peak RTFx", f"{slo} at", f"{slo} req/s",
        f"{slo} RTFx", "$/h", "$/1000 h (peak)", f"$/1000 h ({slo})", "WER",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        values = [
            r.label, r.mode, _level(r.peak_level), r.peak_rps, r.peak_audio_s_per_s,
            _level(r.slo_level), r.slo_rps, r.slo_audio_s_per_s, r.price_per_hour,
            r.cost_1000h_peak, r.cost_1000h_slo, r.wer,
        ]  # fmt: skip
        lines.append("| " + " | ".join(_fmt(v) for v in values) + " |")
    return "\n".join(lines)


def _level(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1 else f"{value:,.2f}"
    return str(value)


def compare_plots(out: Path, runs: list[Run], slo_p99_ms: float | None) -> list[Path]:
    modes = [m for m in ("closed", "open") if any(lv["mode"] == m for r in runs for lv in r.levels)]
    if not modes:
        return []
    latency, throughput = [], []
    for mode in modes:
        p99, rtfx = [], []
        for run in _unique_labels(runs):
            levels = sorted((lv for lv in run.levels if lv["mode"] == mode), key=level_x)
            xs = [level_x(lv) for lv in levels]
            p99.append(Series(run.label, xs, [_num(lv["p99_ms"]) for lv in levels]))
            rtfx.append(Series(run.label, xs, [_num(lv["audio_s_per_s"]) for lv in levels]))
        latency.append(
            Panel(f"p99 latency, {mode} loop", XLABEL[mode], "p99 (ms)", p99, hline=slo_p99_ms)
        )
        throughput.append(Panel(f"throughput, {mode} loop", XLABEL[mode], "RTFx (audio s/s)", rtfx))
    return [
        line_plots(out / "compare_latency.png", latency),
        line_plots(out / "compare_throughput.png", throughput),
    ]


def write_compare(out: Path, runs: list[Run], slo_p99_ms: float | None) -> tuple[list[Row], str]:
    """All outputs of a comparison; returns the rows and the text printed to the terminal."""
    out.mkdir(parents=True, exist_ok=True)
    rows = compare_runs(runs, slo_p99_ms)
    best = cheapest(rows)
    text = markdown(rows, slo_p99_ms)
    if slo_p99_ms is not None:
        text += "\n\n" + _verdict(best, slo_p99_ms)
    write_csv(out / "compare.csv", COLUMNS, (asdict(r) for r in rows))
    write_json(
        out / "compare.json",
        {
            "slo_p99_ms": slo_p99_ms,
            "cheapest_meeting_slo": asdict(best) if best else None,
            "rows": [asdict(r) for r in rows],
        },
    )
    (out / "compare.md").write_text(text + "\n", encoding="utf-8")
    plots = compare_plots(out, runs, slo_p99_ms)
    body = (
        "<h1>Load test comparison</h1>"
        + html_table(COLUMNS, ([getattr(r, c) for c in COLUMNS] for r in rows))
        + (f"<p>{_verdict(best, slo_p99_ms)}</p>" if slo_p99_ms is not None else "")
        + "".join(html_image(p) for p in plots)
    )
    write_html(out / "report.html", body, "whisper-grpc load test comparison")
    return rows, text


def _verdict(best: Row | None, slo_p99_ms: float) -> str:
    if best is None:
        return f"No priced run meets p99 <= {slo_p99_ms:g} ms in closed loop."
    return (
        f"Cheapest meeting p99 <= {slo_p99_ms:g} ms (closed loop): {best.label}, "
        f"${best.cost_1000h_slo:,.2f} per 1,000 audio hours at concurrency "
        f"{best.slo_level:g} ({best.slo_audio_s_per_s:.1f}x real time)."
    )
