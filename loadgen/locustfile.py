"""The same users as a plain locustfile, for Locust's web UI (or its own headless and
distributed modes):

    locust -f loadgen/locustfile.py --host 127.0.0.1:50051 \\
        --dataset ../shared/data/LibriSpeech/test-clean --users 4 --spawn-rate 4

Closed loop by default: each user waits for its response, so --users is the concurrency. With
`--rate-per-user R` each user sends Poisson arrivals at R requests/s instead (open loop: total
rate = users x R). With `--mode stream` each user is a live stream after another, paced in
real time (`--pace`, `--chunk-ms`, `--utterances`), and Locust's statistics show the stream
events by name: final_lag, first_interim, interim, flicker_words, final_wer (percent),
behind_real_time. Locust's charts show client latency; `--loadgen-out DIR` also writes
loadgen's records.csv, summary.csv/json, plots and report.html when the test stops (single
process only: in Locust's own distributed mode use Locust's statistics, or
`python -m loadgen run --master`).

Run from the repository root (or with it on PYTHONPATH) so `loadgen` and `asr` import.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

from locust import events
from locust.runners import LocalRunner, WorkerRunner

import loadgen.green  # noqa: F401  (gRPC's gevent mode before any channel)
from loadgen.config import TOKEN_FILE_ENV, Connection, LevelPlan, bearer_metadata, parse_metadata
from loadgen.dataset import load_dataset
from loadgen.live import parse_pace
from loadgen.users import LoadContext, SpeechUser

__all__ = ["SpeechUser"]  # the user class Locust runs

_run: dict[str, float] = {"started": time.time(), "users": 0}


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    parser.add_argument(
        "--dataset", default="", help="LibriSpeech or audio folder, librispeech:SPLIT"
    )
    parser.add_argument("--limit", type=int, default=0, help="use at most N files (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="sample, replay order, arrivals")
    parser.add_argument(
        "--rate-per-user", type=float, default=0.0, help="open loop: req/s per user"
    )
    parser.add_argument("--mode", default="unary", help="unary, or stream: live streams")
    parser.add_argument("--pace", default="1.0", help="stream: 1.0 real time, 2, or max")
    parser.add_argument("--chunk-ms", type=int, default=100, help="stream: audio per message")
    parser.add_argument("--utterances", type=int, default=1, help="stream: files per stream")
    parser.add_argument("--tls", action="store_true", default=False, help="connect with TLS")
    parser.add_argument("--ca-cert", default="", help="PEM roots to trust (with --tls)")
    parser.add_argument("--grpc-metadata", default="", help="key=value[,key=value...]")
    parser.add_argument("--client-cert", default="", help="PEM client certificate (mTLS)")
    parser.add_argument("--client-key", default="", help="PEM key of --client-cert")
    parser.add_argument(
        "--token-file",
        default=os.environ.get(TOKEN_FILE_ENV, ""),
        help=f"bearer token file [env {TOKEN_FILE_ENV}]",
    )
    parser.add_argument("--grpc-timeout", type=float, default=120.0, help="deadline per call, s")
    parser.add_argument("--loadgen-out", default="", help="write loadgen's report here at stop")


def build_context(environment: Any) -> LoadContext:
    """The process's LoadContext, from Locust's options (on a worker: the master's options,
    which Locust forwards with the first spawn)."""
    opts = environment.parsed_options
    if not opts.dataset:
        raise SystemExit("loadgen locustfile: --dataset is required")
    dataset = load_dataset(opts.dataset, limit=opts.limit or None, seed=opts.seed)
    runner = environment.runner
    worker = f"w{runner.worker_index}" if isinstance(runner, WorkerRunner) else "local"
    ctx = LoadContext(dataset, environment.events.request.fire, worker=worker, seed=opts.seed)
    environment.events.request.add_listener(ctx.recorder.on_request)
    ctx.connect(
        Connection(
            target=str(environment.host or "").split("://")[-1],
            tls=bool(opts.tls),
            ca_pem=Path(opts.ca_cert).read_bytes() if opts.ca_cert else None,
            metadata=parse_metadata([p for p in opts.grpc_metadata.split(",") if p])
            + bearer_metadata(Path(opts.token_file) if opts.token_file else None),
            client_cert_pem=Path(opts.client_cert).read_bytes() if opts.client_cert else None,
            client_key_pem=Path(opts.client_key).read_bytes() if opts.client_key else None,
            timeout_s=opts.grpc_timeout,
            mode=opts.mode,
        )
    )
    ctx.control.begin(_plan(opts))
    return ctx


def _plan(opts: Any) -> LevelPlan:
    """What every user does: live streams, closed loop, or Poisson arrivals per user."""
    if opts.mode == "stream":
        return LevelPlan(0, "stream", 1, streams=1, seed=opts.seed, pace=parse_pace(opts.pace),
                         chunk_ms=opts.chunk_ms, utterances=opts.utterances)  # fmt: skip
    rate = opts.rate_per_user
    mode = "open" if rate > 0 else "closed"
    return LevelPlan(0, mode, 1, rate=rate or None, seed=opts.seed)


SpeechUser.context_factory = build_context


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    _run["started"] = time.time()


@events.spawning_complete.add_listener
def _on_spawned(user_count: int, **_: Any) -> None:
    _run["users"] = user_count


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_: Any) -> None:
    ctx = SpeechUser.ctx
    out = getattr(environment.parsed_options, "loadgen_out", "")
    if not out or ctx is None or not isinstance(environment.runner, LocalRunner):
        return
    _write_report(Path(out), ctx, environment)


def _write_report(out: Path, ctx: LoadContext, environment: Any) -> None:
    from loadgen import report
    from loadgen.stats import LevelResult, summarize

    plan = ctx.control.plan or LevelPlan(0, "closed", 1)
    end = time.time()
    records = ctx.recorder.take()
    users = int(_run["users"]) or None
    summary = summarize(
        records,
        max(end - _run["started"], 1e-9),
        level=0,
        mode=plan.mode,
        concurrency=users if plan.mode == "closed" else None,
        streams=users if plan.mode == "stream" else None,
        rate=(plan.rate or 0) * (users or 1) if plan.mode == "open" else None,
        references=ctx.dataset.references,
    )
    meta = {
        "label": "locustfile",
        "target": ctx.connection.target if ctx.connection else "",
        "started_at": dt.datetime.fromtimestamp(_run["started"], dt.timezone.utc).isoformat(),
        "dataset": ctx.dataset.describe(),
    }
    result = LevelResult(
        plan, summary, records, _run["started"], _run["started"], _run["started"], end
    )
    report.write_run(out, meta, [result])
