"""The seed study, reproducible on any host: Whisper models at several batch sizes, in-process
Hugging Face `generate` next to the same files through the gRPC server.

    python -m server.bench study --dataset DIR --models tiny.en,base --batch-sizes 1,2,4,8,16
    python -m server.bench study compare HOST_DIR... --price LABEL=$/h --out DIR

`study` measures, on the device at hand and in its default dtype (`--dtype auto`), for each
model: `generate` on batches of each size (feature extraction included: time per batch and
per file), then the server (on loopback, max batch = the largest size) at concurrency equal to
each batch size. It writes study.csv, study.json (with the device, dtype and versions) and
study.png (time per file against batch size, one line per model and path).

`study compare` puts several hosts' study.json side by side: per host and model, the cost of
1,000 audio hours at batch 1 (online: one request at a time) and at the best batch (offline:
the batch with the highest throughput), from each host's $/h; and names the cheapest host per
model for each. That is the table the project's seed study drew its conclusion from.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.config import Settings

log = logging.getLogger(__name__)
AUDIO_HOURS = 1000.0


@dataclass(frozen=True)
class StudyRow:
    """One model, one batch size (or concurrency), one path."""

    model: str
    path: str
    """`generate` (in process) or `server` (gRPC on loopback, concurrency = batch_size)."""
    batch_size: int
    files: int
    audio_s: float
    wall_s: float
    s_per_file: float
    s_per_batch: float
    """generate: wall time of one batch; server: mean latency of one request."""
    files_per_s: float
    audio_s_per_s: float
    """RTFx: seconds of audio transcribed per second."""
    p50_ms: float
    p99_ms: float
    mean_server_batch: float
    """The batch the server actually ran (from its timing); equal to batch_size in process."""


COLUMNS = [f.name for f in dataclasses.fields(StudyRow)]


def _row(model: str, path: str, batch: int, bench_row: Any) -> StudyRow:
    import numpy as np

    files, wall = bench_row.files, bench_row.wall_s
    lat = np.asarray(bench_row.latencies_s) * 1000.0
    per_batch = wall / math.ceil(files / batch) if path == "generate" else float(np.mean(lat)) / 1e3
    return StudyRow(
        model=model,
        path=path,
        batch_size=batch,
        files=files,
        audio_s=bench_row.audio_s,
        wall_s=wall,
        s_per_file=wall / files,
        s_per_batch=per_batch,
        files_per_s=files / wall,
        audio_s_per_s=bench_row.audio_s / wall,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        mean_server_batch=float(np.mean(bench_row.batch_sizes)),
    )


def study_model(
    name: str, args: argparse.Namespace, clips: list[Any], batches: list[int]
) -> tuple[list[StudyRow], dict[str, Any]]:
    """Every batch size of one model, in process and through the server."""
    from server.bench import bench_grpc, bench_in_process
    from server.embedded import EmbeddedServer
    from server.models.loader import load_model

    settings = Settings(
        model=name, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir,
        max_batch_size=max(batches), max_wait_ms=args.max_wait_ms,
        max_queue_size=max(256, max(batches)), metrics_port=-1, engine=args.engine,
        max_active=max(batches), warmup=True,
    )  # fmt: skip
    model = load_model(settings)
    info = dataclasses.asdict(model.info)
    rows = []
    for b in batches:
        rows.append(_row(name, "generate", b, bench_in_process(model, clips, b, args.rounds)))
        log.warning("%s generate batch %d: %.3f s per file", name, b, rows[-1].s_per_file)
    server = EmbeddedServer(settings, model).start()
    try:
        for b in batches:
            rows.append(_row(name, "server", b, bench_grpc(server, clips, b, args.rounds)))
            log.warning("%s server c%d: %.3f s per file", name, b, rows[-1].s_per_file)
    finally:
        server.stop()
    return rows, info


def host_facts(models: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    first = next(iter(models.values()), {})
    return {
        "label": args.label or first.get("device_name") or platform.node(),
        "price_per_hour": args.price_per_hour,
        "device": first.get("device"),
        "device_name": first.get("device_name"),
        "dtype": first.get("dtype"),
        "dtype_reason": first.get("dtype_reason"),
        "models": models,
        "engine": args.engine,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(),
            "cuda": torch.version.cuda,
        },
        "dataset": str(args.dataset),
        "files": args.files,
        "rounds": args.rounds,
        "clip_s": [args.min_s, args.max_s],
    }


def write_study(out: Path, facts: dict[str, Any], rows: Sequence[StudyRow]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "study.csv": _csv(out / "study.csv", COLUMNS, [dataclasses.asdict(r) for r in rows]),
        "study.json": out / "study.json",
        "study.png": study_plot(out / "study.png", facts, rows),
    }
    data = {**facts, "rows": [dataclasses.asdict(r) for r in rows]}
    paths["study.json"].write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return paths


def _csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
    return path


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(round(value, 4)) if isinstance(value, float) else str(value)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def study_plot(path: Path, facts: dict[str, Any], rows: Sequence[StudyRow]) -> Path:
    """Time per file against batch size, one line per model: solid in process, dashed
    through the server (concurrency = batch size)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for model in dict.fromkeys(r.model for r in rows):
        for where, style in (("generate", "o-"), ("server", "s--")):
            ours = sorted((r for r in rows if r.model == model and r.path == where),
                          key=lambda r: r.batch_size)  # fmt: skip
            what = "in-process generate" if where == "generate" else "gRPC server (concurrency)"
            if ours:
                xs, ys = [r.batch_size for r in ours], [r.s_per_file * 1000 for r in ours]
                ax.plot(xs, ys, style, label=f"{model}, {what}")
    sizes = sorted({r.batch_size for r in rows})
    if sizes and max(sizes) / min(sizes) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    label, device = str(facts.get("label")), str(facts.get("device_name"))
    title = f"{label + ': ' if label != device else ''}{device}, {facts.get('dtype')}"
    ax.set(xlabel="batch size (server: requests in flight)", ylabel="time per file (ms)",
           title=title)  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_study(args: argparse.Namespace) -> int:
    from server.bench import load_clips

    models = [m for m in args.models.split(",") if m]
    batches = sorted({int(b) for b in args.batch_sizes.split(",") if b})
    if not models or not batches or min(batches) < 1:
        raise SystemExit("study needs --models A,B and --batch-sizes 1,2,... (each >= 1)")
    clips = load_clips(args.dataset, args.min_s, args.max_s, args.files)
    rows: list[StudyRow] = []
    infos: dict[str, dict[str, Any]] = {}
    for name in models:
        model_rows, infos[name] = study_model(name, args, clips, batches)
        rows += model_rows
    facts = host_facts(infos, args)
    paths = write_study(args.out, facts, rows)
    print(markdown(rows))
    print(f"\n{paths['study.csv']}\n{paths['study.png']}")
    return 0


def markdown(rows: Sequence[StudyRow]) -> str:
    header = ["model", "path", "batch", "files", "s/file", "s/batch", "files/s", "RTFx",
              "p50 ms", "p99 ms", "server batch"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.path} | {r.batch_size} | {r.files} | {r.s_per_file:.3f} | "
            f"{r.s_per_batch:.3f} | {r.files_per_s:.2f} | {r.audio_s_per_s:.1f} | "
            f"{r.p50_ms:.0f} | {r.p99_ms:.0f} | {r.mean_server_batch:.1f} |"
        )
    return "\n".join(lines)


# --- study compare -------------------------------------------------------------------------


@dataclass(frozen=True)
class CostRow:
    """One host and model: cost per 1,000 audio hours online (batch 1) and offline."""

    host: str
    device_name: str
    dtype: str
    model: str
    price_per_hour: float | None
    rtfx_batch_1: float | None
    cost_1000h_batch_1: float | None
    best_batch: int | None
    rtfx_best: float | None
    cost_1000h_best: float | None
    server_rtfx_c1: float | None
    """The same at concurrency 1 through the server: what serving costs over plain generate."""


def cost(price: float | None, rtfx: float | None) -> float | None:
    if price is None or not rtfx:
        return None
    return price * AUDIO_HOURS / rtfx


def cost_rows(studies: Sequence[dict[str, Any]]) -> list[CostRow]:
    rows = []
    for study in studies:
        price = study.get("price_per_hour")
        for model in dict.fromkeys(r["model"] for r in study["rows"]):
            gen = [r for r in study["rows"] if r["model"] == model and r["path"] == "generate"]
            one = next((r for r in gen if r["batch_size"] == 1), None)
            best = max(gen, key=lambda r: (r["audio_s_per_s"], -r["batch_size"]), default=None)
            c1 = next((r for r in study["rows"] if r["model"] == model
                       and r["path"] == "server" and r["batch_size"] == 1), None)  # fmt: skip
            rows.append(
                CostRow(
                    host=str(study.get("label")),
                    device_name=str(study.get("device_name")),
                    dtype=str(study.get("dtype")),
                    model=model,
                    price_per_hour=price,
                    rtfx_batch_1=one["audio_s_per_s"] if one else None,
                    cost_1000h_batch_1=cost(price, one["audio_s_per_s"] if one else None),
                    best_batch=best["batch_size"] if best else None,
                    rtfx_best=best["audio_s_per_s"] if best else None,
                    cost_1000h_best=cost(price, best["audio_s_per_s"] if best else None),
                    server_rtfx_c1=c1["audio_s_per_s"] if c1 else None,
                )
            )
    return rows


def cheapest_lines(rows: Sequence[CostRow]) -> list[str]:
    lines = []
    for model in dict.fromkeys(r.model for r in rows):
        ours = [r for r in rows if r.model == model]
        for what, key in (("online (batch 1)", "cost_1000h_batch_1"),
                          ("offline (best batch)", "cost_1000h_best")):  # fmt: skip
            priced = [r for r in ours if getattr(r, key) is not None]
            if priced:
                best = min(priced, key=lambda r: getattr(r, key))
                lines.append(f"{model}, {what}: cheapest is {best.host} at "
                             f"${getattr(best, key):,.2f} per 1,000 audio hours")  # fmt: skip
    return lines


def compare_markdown(rows: Sequence[CostRow]) -> str:
    header = ["host", "device", "dtype", "model", "$/h", "RTFx b1", "$/1000 h b1", "best batch",
              "RTFx best", "$/1000 h best", "server RTFx c1"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.host, r.device_name, r.dtype, r.model, r.price_per_hour, r.rtfx_batch_1,
                 r.cost_1000h_batch_1, r.best_batch, r.rtfx_best, r.cost_1000h_best,
                 r.server_rtfx_c1]  # fmt: skip
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if isinstance(value, float) else str(value)


def parse_prices(pairs: Sequence[str]) -> dict[str, float]:
    prices = {}
    for pair in pairs:
        label, sep, value = pair.rpartition("=")
        try:
            prices[label] = float(value)
        except ValueError:
            label = ""
        if not sep or not label:
            raise SystemExit(f"--price takes LABEL=DOLLARS_PER_HOUR, not {pair!r}")
    return prices


def run_compare(args: argparse.Namespace) -> int:
    prices = parse_prices(args.price)
    studies = []
    for folder in args.studies:
        path = folder / "study.json" if folder.is_dir() else folder
        if not path.is_file():
            raise SystemExit(f"{folder}: no study.json")
        study = json.loads(path.read_text(encoding="utf-8"))
        study["price_per_hour"] = prices.get(str(study.get("label")), study.get("price_per_hour"))
        studies.append(study)
    rows = cost_rows(studies)
    text = compare_markdown(rows) + "\n\n" + "\n".join(cheapest_lines(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    _csv(args.out / "study_compare.csv", [f.name for f in dataclasses.fields(CostRow)],
         [dataclasses.asdict(r) for r in rows])  # fmt: skip
    (args.out / "study_compare.json").write_text(
        json.dumps(
            {"rows": [dataclasses.asdict(r) for r in rows], "cheapest": cheapest_lines(rows)},
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    (args.out / "study_compare.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server.bench study", description=__doc__)
    parser.add_argument("--dataset", type=Path, help="folder of FLAC/WAV (LibriSpeech test)")
    parser.add_argument("--models", default="tiny.en,base")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--files", type=int, default=32, help="files measured per level [32]")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the files [1]")
    parser.add_argument("--min-s", type=float, default=2.0, help="shortest clip, s [2]")
    parser.add_argument("--max-s", type=float, default=30.0, help="longest clip, s [30]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="[auto: the device's default]")
    parser.add_argument("--engine", default="continuous", help="the server's --engine")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--label", default="", help="host name in compare [the device name]")
    parser.add_argument("--price-per-hour", type=float, help="this host's $/h, for compare")
    parser.add_argument("--cache-dir", type=Path, default=Settings().cache_dir)
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    return parser


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server.bench study compare")
    parser.add_argument("studies", nargs="+", type=Path, help="study folders (study.json)")
    parser.add_argument("--price", action="append", default=[], help="LABEL=$/h, repeatable")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main(argv: Sequence[str]) -> int:
    """`study ...` or `study compare ...` (argv without the word `study`)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "compare":
        return run_compare(compare_parser().parse_args(argv[1:]))
    args = build_parser().parse_args(argv)
    if args.dataset is None:
        raise SystemExit("study needs --dataset DIR (LibriSpeech test-clean, say)")
    return run_study(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
