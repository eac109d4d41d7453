"""`python -m loadgen study`: the seed study, reproducible on any host: Whisper models at
several batch sizes and dtypes, in-process Hugging Face `generate` next to the same files
through the gRPC server.

    python -m loadgen study --dataset DIR --models tiny.en,base --batch-sizes 1,2,4,8,16 \\
        --dtypes float32,bfloat16 --files 100 --out OUT
    python -m loadgen study compare HOST_DIR... [--price LABEL=$/h] --out DIR

`study` measures, on the device at hand, for each model and dtype: `generate` on batches of
each size (feature extraction included: time per batch and per file), then the server (on
loopback, max batch = the largest size, speech gates off so it decodes every file as
`generate` does) at concurrency equal to each batch size. Every shape is run once untimed
first (the first call of a shape creates its kernels). It writes OUT/study.csv (a row per
model, dtype, path and batch: files/s, RTFx, p50, p99, WER, the batch the server ran),
study.json (the same with the device, dtype and why, versions) and study.png (time per file
against batch size, one line per model, dtype and path).

`study compare` puts several hosts' study.json side by side: per host, model and dtype, the
cost of 1,000 audio hours at batch 1 (online: one request at a time) and at the best batch
(offline: the batch with the highest throughput), from each host's $/h (`--price`, else the
study's `--price-per-hour`, else the seed's card prices for hosts labelled as in
`loadgen.costs.SEED_PRICES`); and names the cheapest host per model for each.
"""

from __future__ import annotations

import argparse
import asyncio
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

from loadgen.costs import SEED_PRICES, cost_per_1000h, parse_prices
from loadgen.dataset import DEFAULT_DATASET, Clip, load_clips
from loadgen.errors import UsageError
from loadgen.inprocess.measure import InProcess, Row, Served, served_settings
from loadgen.plots import pyplot
from loadgen.writers import markdown_table, write_csv, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyRow:
    """One model, dtype, batch size (or concurrency) and path."""

    model: str
    dtype: str
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
    wer: float | None
    """Corpus WER against the references (Whisper's English normalizer); None without them."""
    mean_server_batch: float
    """The batch the server actually ran (from its timing); equal to batch_size in process."""


COLUMNS = [f.name for f in dataclasses.fields(StudyRow)]


def study_row(
    model: str, dtype: str, path: str, batch: int, row: Row, clips: list[Clip]
) -> StudyRow:
    files, wall = row.files, row.wall_s
    per_batch = (wall / math.ceil(files / batch) if path == "generate"
                 else sum(row.latencies_s) / files)  # fmt: skip
    return StudyRow(
        model=model, dtype=dtype, path=path, batch_size=batch, files=files, audio_s=row.audio_s,
        wall_s=wall, s_per_file=wall / files, s_per_batch=per_batch, files_per_s=files / wall,
        audio_s_per_s=row.audio_s / wall, p50_ms=row.p_ms(50), p99_ms=row.p_ms(99),
        wer=_wer(row, clips), mean_server_batch=row.mean_batch,
    )  # fmt: skip


def _wer(row: Row, clips: list[Clip]) -> float | None:
    if any(c.reference is None for c in clips):
        return None
    from loadgen.wer import word_error_rate

    return word_error_rate([c.reference or "" for c in clips],
                           [row.texts[i] for i in range(len(clips))])  # fmt: skip


async def study_model(
    name: str, dtype: str, args: argparse.Namespace, clips: list[Clip], batches: list[int]
) -> tuple[list[StudyRow], dict[str, Any]]:
    """Every batch size of one model in one dtype, in process and through the server."""
    from server.models.loader import load_model

    settings = served_settings(
        model=name, device=args.device, dtype=dtype, cache_dir=args.cache_dir,
        max_batch_size=max(batches), max_wait_ms=args.max_wait_ms, engine=args.engine,
        max_active=max(batches), num_threads=args.threads, max_new_tokens=args.max_new_tokens,
    )  # fmt: skip
    model = load_model(settings)
    info = dataclasses.asdict(model.info)
    work = list(range(len(clips))) * args.rounds
    rows = []
    for b in batches:
        runner = InProcess(model, b)
        await runner.run(clips, work)
        rows.append(study_row(name, info["dtype"], "generate", b, runner.row, clips))
        log.warning("%s %s generate batch %d: %.3f s per file", name, info["dtype"], b,
                    rows[-1].s_per_file)  # fmt: skip
    for b in batches:
        served = Served(settings, model, b)
        try:
            await served.run(clips, work)
        finally:
            served.close()
        info["decode_step"] = served.decode_step
        rows.append(study_row(name, info["dtype"], "server", b, served.row, clips))
        log.warning("%s %s server c%d: %.3f s per file", name, info["dtype"], b,
                    rows[-1].s_per_file)  # fmt: skip
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
        "threads": args.threads,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "platform": platform.platform(),
            "cpu": platform.machine(),  # not processor(): that runs `uname -p`
            "cuda": torch.version.cuda,
        },
        "dataset": str(args.dataset),
        "files": args.files,
        "rounds": args.rounds,
        "clip_s": [args.min_s, args.max_s],
    }


def write_study(out: Path, facts: dict[str, Any], rows: Sequence[StudyRow]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    data = [dataclasses.asdict(r) for r in rows]
    return {
        "study.csv": write_csv(out / "study.csv", COLUMNS, data),
        "study.json": write_json(out / "study.json", {**facts, "rows": data}),
        "study.png": study_plot(out / "study.png", facts, rows),
    }


def study_plot(path: Path, facts: dict[str, Any], rows: Sequence[StudyRow]) -> Path:
    """Time per file against batch size, one line per model and dtype: solid in process,
    dashed through the server (concurrency = batch size)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.6))
    for model, dtype in dict.fromkeys((r.model, r.dtype) for r in rows):
        for where, style in (("generate", "o-"), ("server", "s--")):
            ours = sorted((r for r in rows if (r.model, r.dtype, r.path) == (model, dtype, where)),
                          key=lambda r: r.batch_size)  # fmt: skip
            what = "in-process generate" if where == "generate" else "gRPC server (concurrency)"
            if ours:
                xs, ys = [r.batch_size for r in ours], [r.s_per_file * 1000 for r in ours]
                ax.plot(xs, ys, style, label=f"{model} {dtype}, {what}")
    sizes = sorted({r.batch_size for r in rows})
    if sizes and max(sizes) / min(sizes) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    label, device = str(facts.get("label")), str(facts.get("device_name"))
    ax.set(xlabel="batch size (server: requests in flight)", ylabel="time per file (ms)",
           title=f"{label + ': ' if label != device else ''}{device}")  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    # Below the axes, two columns: inside, it hid the lines of the slower models.
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_study(args: argparse.Namespace) -> int:
    models = [m for m in args.models.split(",") if m]
    dtypes = [d for d in args.dtypes.split(",") if d]
    batches = sorted({int(b) for b in args.batch_sizes.split(",") if b})
    if not models or not dtypes or not batches or min(batches) < 1:
        raise UsageError("study needs --models A,B, --dtypes X,Y and --batch-sizes 1,2,... (>= 1)")
    clips = load_clips(args.dataset, files=args.files, min_s=args.min_s, max_s=args.max_s)
    rows: list[StudyRow] = []
    infos: dict[str, dict[str, Any]] = {}
    for name in models:
        for dtype in dtypes:
            model_rows, info = asyncio.run(study_model(name, dtype, args, clips, batches))
            infos[f"{name} {info['dtype']}"] = info
            rows += model_rows
    paths = write_study(args.out, host_facts(infos, args), rows)
    print(markdown(rows))
    print(f"\n{paths['study.csv']}\n{paths['study.png']}")
    return 0


def markdown(rows: Sequence[StudyRow]) -> str:
    header = ["model", "dtype", "path", "batch", "files", "s/file", "s/batch", "files/s", "RTFx",
              "p50 ms", "p99 ms", "WER", "server batch"]  # fmt: skip
    return markdown_table(header, (
        [r.model, r.dtype, r.path, str(r.batch_size), str(r.files), f"{r.s_per_file:.3f}",
         f"{r.s_per_batch:.3f}", f"{r.files_per_s:.2f}", f"{r.audio_s_per_s:.1f}",
         f"{r.p50_ms:.0f}", f"{r.p99_ms:.0f}", "-" if r.wer is None else f"{r.wer:.1%}",
         f"{r.mean_server_batch:.1f}"]
        for r in rows
    ))  # fmt: skip


# --- study compare -------------------------------------------------------------------------


@dataclass(frozen=True)
class CostRow:
    """One host, model and dtype: cost per 1,000 audio hours online (batch 1) and offline."""

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


def cost_rows(studies: Sequence[dict[str, Any]]) -> list[CostRow]:
    rows = []
    for study in studies:
        price = study.get("price_per_hour")
        default = str(study.get("dtype"))
        for model, dtype in dict.fromkeys((r["model"], r.get("dtype", default))
                                          for r in study["rows"]):  # fmt: skip
            ours = [
                r for r in study["rows"] if (r["model"], r.get("dtype", default)) == (model, dtype)
            ]
            gen = [r for r in ours if r["path"] == "generate"]
            one = next((r for r in gen if r["batch_size"] == 1), None)
            best = max(gen, key=lambda r: (r["audio_s_per_s"], -r["batch_size"]), default=None)
            c1 = next((r for r in ours if r["path"] == "server" and r["batch_size"] == 1), None)
            rtfx_1 = one["audio_s_per_s"] if one else None
            rtfx_best = best["audio_s_per_s"] if best else None
            rows.append(
                CostRow(
                    host=str(study.get("label")), device_name=str(study.get("device_name")),
                    dtype=dtype, model=model, price_per_hour=price, rtfx_batch_1=rtfx_1,
                    cost_1000h_batch_1=cost_per_1000h(price, rtfx_1),
                    best_batch=best["batch_size"] if best else None, rtfx_best=rtfx_best,
                    cost_1000h_best=cost_per_1000h(price, rtfx_best),
                    server_rtfx_c1=c1["audio_s_per_s"] if c1 else None,
                )
            )  # fmt: skip
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
                lines.append(f"{model}, {what}: cheapest is {best.host} ({best.dtype}) at "
                             f"${getattr(best, key):,.2f} per 1,000 audio hours")  # fmt: skip
    return lines


def compare_markdown(rows: Sequence[CostRow]) -> str:
    header = ["host", "device", "dtype", "model", "$/h", "RTFx b1", "$/1000 h b1", "best batch",
              "RTFx best", "$/1000 h best", "server RTFx c1"]  # fmt: skip
    return markdown_table(header, (
        [_fmt(c) for c in (r.host, r.device_name, r.dtype, r.model, r.price_per_hour,
                           r.rtfx_batch_1, r.cost_1000h_batch_1, r.best_batch, r.rtfx_best,
                           r.cost_1000h_best, r.server_rtfx_c1)]
        for r in rows
    ))  # fmt: skip


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if isinstance(value, float) else str(value)


def run_compare(args: argparse.Namespace) -> int:
    prices = parse_prices(args.price)
    studies = []
    for folder in args.studies:
        path = folder / "study.json" if folder.is_dir() else folder
        if not path.is_file():
            raise UsageError(f"{folder}: no study.json")
        study = json.loads(path.read_text(encoding="utf-8"))
        label = str(study.get("label"))
        study["price_per_hour"] = prices.get(
            label, study.get("price_per_hour") or SEED_PRICES.get(label)
        )
        studies.append(study)
    rows = cost_rows(studies)
    cheapest = cheapest_lines(rows)
    text = compare_markdown(rows) + "\n\n" + "\n".join(cheapest)
    args.out.mkdir(parents=True, exist_ok=True)
    data = [dataclasses.asdict(r) for r in rows]
    write_csv(args.out / "study_compare.csv", [f.name for f in dataclasses.fields(CostRow)], data)
    write_json(args.out / "study_compare.json", {"rows": data, "cheapest": cheapest})
    (args.out / "study_compare.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from server.config import default_cache_dir

    parser = argparse.ArgumentParser(
        prog="python -m loadgen study", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="data set spec [sample]")
    parser.add_argument("--models", default="tiny.en,base")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--dtypes", "--dtype", default="auto",
                        help="comma list: auto (the device's default), float32, bfloat16, "
                        "float16 [auto]")  # fmt: skip
    parser.add_argument("--files", type=int, default=100, help="files measured per level [100]")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the files [1]")
    parser.add_argument("--min-s", type=float, default=0.0, help="shortest clip, s [0]")
    parser.add_argument("--max-s", type=float, default=30.0, help="longest clip, s [30]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads [0: all cores]")
    parser.add_argument("--max-new-tokens", type=int, default=440,
                        help="longest transcript per 30 s window, tokens [440]")  # fmt: skip
    parser.add_argument("--engine", default="continuous", help="the server's --engine")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--label", default="", help="host name in compare [the device name]")
    parser.add_argument("--price-per-hour", type=float, help="this host's $/h, for compare")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    return parser


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadgen study compare")
    parser.add_argument("studies", nargs="+", type=Path, help="study folders (study.json)")
    parser.add_argument("--price", action="append", default=[], help="LABEL=$/h, repeatable")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`study ...` or `study compare ...` (argv without the word `study`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv[:1] == ["compare"]:
            return run_compare(compare_parser().parse_args(argv[1:]))
        return run_study(build_parser().parse_args(argv))
    except UsageError as err:
        print(f"study: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
