"""python -m loadgen COMMAND: the one home of measuring (console script whisper-grpc-loadgen).

Against a server (Locust; no torch):
    run      sweep a server over --concurrency (closed loop) and/or --rate (open loop) levels,
             or --streams (live real-time streams, --mode stream); --find-capacity searches;
             --spawn-server starts one on loopback first (what `make loadtest` does)
    compare  put several run folders side by side, with SLO capacity and cost
    fetch    download a LibriSpeech split from OpenSLR into the cache
    soak     N minutes of mixed unary calls and real-time streams: RSS series and a verdict

In process (torch and transformers load for these alone; each has its own --help):
    study      the seed study: models x batch sizes, generate and the server; `study compare`
    engines    continuous against generate engine against in-process generate
    precision  float32 against bfloat16, unary and real-time streams
    languages  the language a model detects on other languages' speech (espeak-ng or files)
    decode     the decode step benchmark: eager against compiled
    finals     stream finals against Recognize on the same files (WER, differing transcripts)
    neighbour  a neighbour's latency beside beam search / word times; detection throughput
    gpu-pack   pack what the first-GPU check needs;  gpu-check  run it

Flags and environment of run/compare/fetch are read here and nowhere else; the other commands
parse their own. Only `run` imports Locust (which monkey-patches the process with gevent), and
only after its flags are validated.
Exit codes: 0 done, 1 the server or the network failed us, 2 bad usage or an unsupported mode.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from loadgen import __version__
from loadgen.config import (
    DEFAULT_CACHE_DIR,
    TOKEN_FILE_ENV,
    ConfigError,
    Connection,
    RunConfig,
    bearer_metadata,
    parse_float_list,
    parse_int_list,
    parse_metadata,
)
from loadgen.dataset import DEFAULT_DATASET
from loadgen.errors import LoadgenError

PASS_THROUGH = {
    "study": ("loadgen.inprocess.study", "the seed study (models x batch sizes); study compare"),
    "engines": ("loadgen.inprocess.engines", "continuous vs generate engine vs generate"),
    "precision": ("loadgen.inprocess.precision", "float32 vs bfloat16, unary and streams"),
    "languages": (
        "loadgen.inprocess.languages",
        "the language detected on other languages' speech (espeak-ng), server and generate",
    ),
    "soak": ("loadgen.soak", "minutes of mixed load: RSS series, errors, growth verdict"),
    "decode": ("loadgen.inprocess.decode_bench", "the decode step benchmark"),
    "finals": (
        "loadgen.inprocess.finals",
        "stream finals against unary transcripts of the same files",
    ),
    "neighbour": (
        "loadgen.inprocess.neighbour",
        "what beam search or word times cost others",
    ),
    "gpu-pack": ("loadgen.gpu.pack", "pack what the first-GPU check needs"),
    "gpu-check": ("loadgen.gpu.check", "the first-GPU check"),
}
"""Commands whose module parses its own flags (`main(argv)`), imported only when used."""
ENV_CACHE_DIR = "WHISPER_GRPC_LOADGEN_CACHE_DIR"
ENV_BASE_URL = "WHISPER_GRPC_LOADGEN_BASE_URL"
log = logging.getLogger("loadgen")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whisper-grpc-loadgen", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, Locust's too")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub.add_parser("run", help="sweep load levels against a server"))
    _add_compare(sub.add_parser("compare", help="compare run folders"))
    _add_fetch(sub.add_parser("fetch", help="download a LibriSpeech split"))
    for name, (_, about) in PASS_THROUGH.items():  # listed in --help; main() dispatches them
        sub.add_parser(name, help=about, add_help=False).add_argument(
            "args", nargs=argparse.REMAINDER
        )
    parser.epilog = "Each command has its own --help."
    return parser


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", help="HOST:PORT of the Speech server")
    p.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help="sample[:SPLIT] (the shipped utterances), LibriSpeech folder, audio folder, "
        f"librispeech:SPLIT, hf:NAME [{DEFAULT_DATASET}]",
    )
    p.add_argument(
        "--out", type=Path, help="folder for summary.csv/json, records.csv, plots, report"
    )
    p.add_argument("--limit", type=int, help="use at most N files (a seeded sample)")
    p.add_argument("--seed", type=int, default=0, help="file sample, replay order, arrivals [0]")
    p.add_argument("--label", default="", help="name of this run, e.g. the instance type")
    p.add_argument("--price-per-hour", type=float, help="instance price, $/h, for compare")
    p.add_argument("--wait-ready", type=float, default=60.0, help="wait for SERVING, s [60]")
    p.add_argument(
        "--spawn-server",
        action="store_true",
        help="start `python -m server` on a free loopback port, wait for SERVING, sweep it, "
        "stop it (its log: OUT/server.log); instead of --target",
    )
    p.add_argument(
        "--server-args",
        default="",
        help='flags for the spawned server, one string: --server-args="--model base" [none]',
    )
    p.add_argument("--progress-interval", type=float, default=2.0, help="progress line, s [2]")
    _add_level_flags(p.add_argument_group("load levels"))
    _add_stream_flags(p.add_argument_group("live streams (--mode stream)"))
    _add_connection_flags(p.add_argument_group("connection"))
    _add_cache_flags(p)
    _add_distributed_flags(p.add_argument_group("distributed (Locust master/worker)"))


def _add_level_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--concurrency", default="", help="closed-loop levels, e.g. 1,2,4,8")
    g.add_argument("--rate", default="", help="open-loop levels in requests/s, e.g. 1,2,4")
    g.add_argument("--duration", type=float, default=30.0, help="measurement window, s [30]")
    g.add_argument("--warmup", type=float, default=5.0, help="unmeasured load per level, s [5]")
    g.add_argument(
        "--stability",
        action="store_true",
        help="repeat --duration windows until 3 agree within --stability-tolerance on "
        "throughput and p99 (perf_analyzer's rule), at most --max-windows",
    )
    g.add_argument("--max-windows", type=int, default=10, help="cap with --stability [10]")
    g.add_argument("--stability-tolerance", type=float, default=0.10, help="[0.10]")
    g.add_argument("--max-inflight", type=int, default=1000, help="open loop: drop beyond [1000]")
    g.add_argument("--late-ms", type=float, default=20.0, help="open loop: late beyond, ms [20]")
    g.add_argument("--generators", type=int, default=1, help="open loop: generators/process [1]")
    g.add_argument(
        "--find-capacity",
        action="store_true",
        help="search (grow x2, then bisect) for the highest level meeting the SLO, from the "
        "one level given (--concurrency N, --rate R or --streams N); each probe is measured "
        "like any level",
    )
    g.add_argument("--slo-p99-ms", type=float, help="--find-capacity: unary p99 at most")
    g.add_argument("--slo-final-p99-ms", type=float, help="--find-capacity: p99 final lag")
    g.add_argument("--max-capacity", type=float, default=1024, help="probe no higher [1024]")


def _add_stream_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--streams", default="", help="live-stream levels (--mode stream): 1,2,4")
    g.add_argument(
        "--pace",
        default="1.0",
        help="audio seconds sent per second: 1.0 real time, 2 twice as fast, max as fast as "
        "the server reads [1.0]",
    )
    g.add_argument("--chunk-ms", type=int, default=100, help="audio per message, ms [100]")
    g.add_argument("--utterances", type=int, default=1, help="files per stream [1]")
    g.add_argument("--gap-ms", type=int, default=1500, help="silence between them, ms [1500]")
    g.add_argument(
        "--behind-ms", type=float, default=500, help="a chunk this late: stream behind [500]"
    )
    g.add_argument(
        "--interim-interval-ms", type=int, default=0, help="interim cadence to ask for [server's]"
    )


def _add_connection_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--mode",
        choices=["unary", "stream"],
        default="unary",
        help="Recognize, or live StreamingRecognize streams (levels from --streams) [unary]",
    )
    g.add_argument(
        "--api",
        choices=["asr", "google", "riva"],
        default="asr",
        help="send asr.v1, Google Cloud Speech v1 or Riva ASR requests (the same server "
        "serves all three) [asr]",
    )
    env = os.environ  # LOADGEN_TLS and the files below: for compose, where flags are fixed
    g.add_argument(
        "--tls",
        action="store_true",
        default=env.get("LOADGEN_TLS", "").lower() in ("1", "true", "yes", "on"),
        help="connect with TLS [env LOADGEN_TLS]",
    )
    for flag, var, text in (
        ("--ca-cert", "LOADGEN_CA_CERT", "PEM roots to trust (with --tls)"),
        ("--client-cert", "LOADGEN_CLIENT_CERT", "PEM client certificate (mutual TLS)"),
        ("--client-key", "LOADGEN_CLIENT_KEY", "PEM key of --client-cert"),
    ):
        g.add_argument(flag, type=Path, default=env.get(var) or None, help=f"{text} [env {var}]")
    g.add_argument(
        "--token-file",
        type=Path,
        default=os.environ.get(TOKEN_FILE_ENV) or None,
        help=f"bearer token file: sends 'authorization: Bearer ...' [env {TOKEN_FILE_ENV}]",
    )
    g.add_argument("--metadata", action="append", default=[], help="key=value, repeatable")
    g.add_argument("--timeout", type=float, default=120.0, help="deadline per call, s [120]")
    g.add_argument("--channels", type=int, default=1, help="gRPC connections per process [1]")


def _add_distributed_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--master", action="store_true", help="drive workers instead of users")
    g.add_argument("--expect-workers", type=int, default=0, help="workers to wait for")
    g.add_argument("--master-bind-host", default="*", help="[* = all interfaces]")
    g.add_argument("--master-bind-port", type=int, default=5557, help="[5557; 0 = any]")
    g.add_argument("--worker-timeout", type=float, default=120.0, help="wait for workers, s")
    g.add_argument("--worker", action="store_true", help="generate load for a master")
    g.add_argument("--master-host", default="127.0.0.1", help="the master, for --worker")
    g.add_argument("--master-port", type=int, default=5557, help="[5557]")


def _add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with summary.json)")
    p.add_argument("--out", type=Path, required=True, help="folder for the comparison")
    p.add_argument("--slo-p99-ms", type=float, help="latency SLO for the capacity column")
    p.add_argument("--slo-final-p99-ms", type=float, help="stream runs: SLO on the p99 final lag")
    p.add_argument(
        "--price",
        action="append",
        default=[],
        help="LABEL=$/h: price a run (or override its --price-per-hour), repeatable",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="compare runs that differ in data set, mode, model, dtype or load settings "
        "(printed as a warning above the table) instead of refusing",
    )


def _add_fetch(p: argparse.ArgumentParser) -> None:
    p.add_argument("corpus", choices=["librispeech"])
    p.add_argument("splits", nargs="+", help="test-clean, test-other, dev-clean, ...")
    p.add_argument("--sha256", help="expected sha256 (overrides the built-in table)")
    p.add_argument("--md5", help="expected md5 (overrides the built-in table)")
    p.add_argument("--force", action="store_true", help="download and unpack again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_cache_flags(p)


def _add_cache_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get(ENV_CACHE_DIR, DEFAULT_CACHE_DIR)),
        help=f"downloaded data sets [env {ENV_CACHE_DIR}; {DEFAULT_CACHE_DIR}]",
    )
    p.add_argument(
        "--base-url",
        default=os.environ.get(ENV_BASE_URL, ""),
        help=f"LibriSpeech mirror [env {ENV_BASE_URL}; https://www.openslr.org/resources/12]",
    )


def run_config(args: argparse.Namespace) -> RunConfig:
    """Validated RunConfig from `run` flags; raises ConfigError naming the flag."""
    if not args.target or not args.dataset or not args.out:
        raise ConfigError("run needs --target, --dataset and --out (or --worker)")
    ca_pem = args.ca_cert.read_bytes() if args.ca_cert else None
    connection = Connection(
        target=args.target,
        tls=args.tls,
        ca_pem=ca_pem,
        metadata=parse_metadata(args.metadata) + bearer_metadata(args.token_file),
        client_cert_pem=args.client_cert.read_bytes() if args.client_cert else None,
        client_key_pem=args.client_key.read_bytes() if args.client_key else None,
        timeout_s=args.timeout,
        channels=args.channels,
        mode=args.mode,
        api=args.api,
    )
    concurrency = parse_int_list(args.concurrency, "--concurrency")
    streams = parse_int_list(args.streams, "--streams")
    if args.mode == "stream" and concurrency and not streams:
        # Deployments pass --concurrency whatever the mode (compose, Kubernetes): in stream
        # mode its levels are the numbers of concurrent live streams.
        log.info("--mode stream: the --concurrency levels %s are live streams", concurrency)
        concurrency, streams = (), concurrency
    return RunConfig(
        connection=connection,
        dataset=args.dataset,
        out=args.out,
        concurrency=concurrency,
        rates=parse_float_list(args.rate, "--rate"),
        streams=streams,
        pace=_pace(args.pace),
        chunk_ms=args.chunk_ms,
        utterances=args.utterances,
        gap_ms=args.gap_ms,
        behind_ms=args.behind_ms,
        interim_interval_ms=args.interim_interval_ms,
        find_capacity=args.find_capacity,
        slo_p99_ms=args.slo_p99_ms,
        slo_final_p99_ms=args.slo_final_p99_ms,
        max_capacity=args.max_capacity,
        duration_s=args.duration,
        warmup_s=args.warmup,
        stability=args.stability,
        max_windows=args.max_windows,
        stability_tolerance=args.stability_tolerance,
        limit=args.limit,
        seed=args.seed,
        label=args.label,
        price_per_hour=args.price_per_hour,
        max_inflight=args.max_inflight,
        late_ms=args.late_ms,
        generators=args.generators,
        wait_ready_s=args.wait_ready,
        progress_interval_s=args.progress_interval,
        cache_dir=args.cache_dir,
        base_url=args.base_url,
        master=args.master,
        expect_workers=args.expect_workers,
        master_bind_host=args.master_bind_host,
        master_bind_port=args.master_bind_port,
        worker_timeout_s=args.worker_timeout,
    )


def _pace(text: str) -> float:
    from loadgen.live import parse_pace

    try:
        return parse_pace(text)
    except ValueError as err:
        raise ConfigError(f"--pace takes a number > 0 or max, not {text!r}") from err


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.worker:
        if not args.dataset:
            raise ConfigError("--worker needs --dataset (the same as the master's)")
        import loadgen.green
        from loadgen.distributed import run_worker

        return run_worker(
            args.master_host,
            args.master_port,
            args.dataset,
            limit=args.limit,
            seed=args.seed,
            cache_dir=args.cache_dir,
            base_url=args.base_url or None,
        )
    if args.spawn_server:
        return _run_spawned(args, argv)
    config = run_config(args)
    import loadgen.green  # noqa: F401
    from loadgen import runner

    code, table = runner.run(config, argv)
    print(table)
    return code


SPAWN_WAIT_S = 600.0
"""How long a spawned server may take to say SERVING (a first start converts a built-in)."""


def _run_spawned(args: argparse.Namespace, argv: list[str]) -> int:
    """A server of our own, then `run` against it in a child process: this one never imports
    gevent, so the health wait and the server's lifetime stay plain threads and signals."""
    import shlex
    import subprocess

    from loadgen.spawn import start_server

    if args.target or not args.out:
        raise ConfigError("--spawn-server needs --out and starts its own server: no --target")
    child = [sys.executable, "-m", "loadgen", *_without_spawn_flags(argv)]
    server = start_server(
        shlex.split(args.server_args), log_path=args.out / "server.log", timeout_s=SPAWN_WAIT_S
    )
    try:
        return subprocess.call([*child, "--target", server.address])
    finally:
        server.stop()


def _without_spawn_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--server-args":
            skip = True
        elif token != "--spawn-server" and not token.startswith("--server-args="):
            out.append(token)
    return out


def _compare(args: argparse.Namespace) -> int:
    from loadgen.compare import load_run, write_compare
    from loadgen.costs import parse_prices

    prices = parse_prices(args.price)
    runs = [load_run(path, prices) for path in args.runs]
    _, text = write_compare(
        args.out, runs, args.slo_p99_ms, force=args.force, slo_final_p99_ms=args.slo_final_p99_ms
    )
    print(text)
    print(f"\nreport: {args.out / 'report.html'}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from loadgen.fetch import ensure_librispeech

    for split in args.splits:
        path = ensure_librispeech(
            split,
            args.cache_dir,
            args.base_url or None,
            sha256=args.sha256,
            md5=args.md5,
            force=args.force,
            progress=not args.no_progress,
        )
        print(path)
    return 0


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:  # Locust narrates every spawn; keep its warnings only
        logging.getLogger("locust").setLevel(logging.WARNING)


def _pass_through(command: str, argv: list[str]) -> int:
    """Import the command's module only now (torch, transformers) and hand it its flags."""
    import importlib

    module_name = PASS_THROUGH[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            print(f"loadgen {command}: {module_name} is not part of this checkout", file=sys.stderr)
        else:
            print(f"loadgen {command} needs {err.name}, which is not installed "
                  "(make install sets up everything)", file=sys.stderr)  # fmt: skip
        return 2
    code: int = module.main(argv)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASS_THROUGH:
        # In-process servers run their models on a worker thread, as the server does: the
        # same OpenMP wait policy, set before torch loads (server.openmp). Only here: the
        # Locust side imports nothing of the server.
        from server.openmp import tune_openmp

        tune_openmp()
        return _pass_through(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "run":
            return _run(args, argv)
        if args.command == "compare":
            return _compare(args)
        return _fetch(args)
    except LoadgenError as err:
        log.error("%s", err)
        return err.exit_code
    except FileNotFoundError as err:  # a run folder or --ca-cert that is not there
        log.error("%s", err)
        return 2
