"""The first-GPU check: one run, one JSON file of figures, on a machine with one NVIDIA GPU and
no network (run it through `scripts/gpu_check.sh`, which installs the pack's wheels first).

    python scripts/gpu_check.py --pack .gpu-pack --out gpu_check.json [--budget-s 420]

1. The environment: Python, torch, transformers, CUDA, the GPU's name and memory.
2. The GPU-marked tests (`tests/gpu`: fp16 and bf16, both engines, drafts, joins and leaves,
   fallbacks, word times) on the pack's tiny.en, results per test.
3. Throughput and latency (p50/p99) through gRPC at concurrency 1, 8, 32 and 64 (continuous
   engine, fp16, on loopback, each client sending the next file when the last returns), next
   to in-process transformers `generate` at batch 1 and 32 on the same files.
The weights are the pack's: tiny.en stored as int8 per row and dequantized to fp16 on arrival
(close to tiny.en, not equal: the JSON says so); transcripts are compared between the
configurations of this run, and WER against LibriSpeech is for orientation only.

Without CUDA it writes {"skipped": "..."} and exits 0: the script can be tried anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
WEIGHTS_NOTE = (
    "tiny.en weights stored as int8 per row (absmax/127, fp16 scales) and dequantized to fp16 "
    "on arrival: close to tiny.en, not equal to it"
)


def environment() -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}",
        )  # fmt: skip
    return env


def run_tests(checkpoint: Path, audio: Path, timeout_s: float, device: str) -> dict[str, Any]:
    report = Path(tempfile.mkdtemp()) / "gpu-tests.xml"
    env = {**os.environ, "WHISPER_GRPC_TEST_CHECKPOINT": str(checkpoint)}
    env["WHISPER_GRPC_TEST_AUDIO"] = str(audio)
    env["WHISPER_GRPC_TEST_DEVICE"] = device
    command = [
        sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider",
        f"--junitxml={report}", "-o", "addopts=",
    ]  # fmt: skip
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, timeout=timeout_s, capture_output=True, text=True
        )
    except subprocess.TimeoutExpired:
        return {"error": f"tests ran past {timeout_s:.0f} s"}
    out: dict[str, Any] = {
        "exit_code": done.returncode,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    out["tail"] = (done.stdout + done.stderr)[-3000:]
    if report.exists():
        cases = []
        for case in ET.parse(report).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = child.tag
            cases.append(
                {"test": case.get("name"), "outcome": outcome, "s": float(case.get("time", 0))}
            )
        out["cases"] = cases
        out["passed"] = sum(c["outcome"] == "passed" for c in cases)
        out["failed"] = sum(c["outcome"] in ("failure", "error") for c in cases)
        out["skipped"] = sum(c["outcome"] == "skipped" for c in cases)
    return out


def row_figures(row: Any, base: Any, clips: list[Any]) -> dict[str, Any]:
    import numpy as np

    from server.evaluation import word_error_rate

    indices = sorted(row.texts)
    same = sum(row.texts[i] == base.texts.get(i) for i in indices)
    refs, hyps = [clips[i].reference for i in indices], [row.texts[i] for i in indices]
    return {
        "name": row.name, "requests": len(row.latencies_s),
        "files_per_s": round(len(row.latencies_s) / row.wall_s, 2),
        "audio_s_per_s": round(row.audio_s / row.wall_s, 1),
        "p50_ms": round(float(np.percentile(row.latencies_s, 50)) * 1000, 1),
        "p99_ms": round(float(np.percentile(row.latencies_s, 99)) * 1000, 1),
        "same_transcript_as_batch_1": f"{same}/{len(indices)}",
        "wer": round(word_error_rate(refs, hyps), 4),
        "note": row.note,
    }  # fmt: skip


async def benchmark(
    model: Any, clips: list[Any], levels: list[int], deadline: float
) -> dict[str, Any]:
    """In-process generate at batch 1 and 32, then the server at each level; each level sends
    at least 4 requests per client (the files repeat) so percentiles have samples."""
    from bench_engines import Engine, InProcess

    args = argparse.Namespace(
        max_batch_size=32, max_wait_ms=10.0, max_prepare_wait_ms=100.0, max_active=64,
        max_join_share=1.0,
    )  # fmt: skip
    every = list(range(len(clips)))
    await InProcess(model, 4).run(clips, every[:8])  # warm-up: kernels, allocator
    rows, figures = [], []
    base = InProcess(model, 1)
    await base.run(clips, every)
    rows.append(base)
    big = InProcess(model, 32)
    await big.run(clips, every + every)
    rows.append(big)
    figures += [row_figures(r.row, base.row, clips) for r in rows]
    for c in levels:
        if time.monotonic() > deadline:
            figures.append(
                {"name": f"continuous engine, concurrency {c}", "skipped": "out of time"}
            )
            continue
        engine = Engine("continuous", model, c, args)
        n = max(len(clips), 4 * c)
        await engine.run(clips, [i % len(clips) for i in range(n)])
        await engine.close()
        figures.append(row_figures(engine.row, base.row, clips))
    return {"rows": figures, "settings": vars(args)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--pack", type=Path, default=ROOT / ".gpu-pack")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="stop starting new work after this"
    )
    parser.add_argument("--levels", default="1,8,32,64")
    parser.add_argument("--skip-tests", action="store_true")
    # For a dry run of the script itself on a CPU: --device cpu --dtype float32 --files 4.
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--files", type=int, default=0, help="use only the first N files")
    args = parser.parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget_s
    result: dict[str, Any] = {
        "weights": WEIGHTS_NOTE,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    result["environment"] = environment()

    def write() -> None:
        result["wall_s"] = round(time.monotonic() - started, 1)
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))

    if args.device.startswith("cuda") and not result["environment"]["cuda_available"]:
        result["skipped"] = "no CUDA device: nothing measured (the script and its pack are ready)"
        write()
        return 0
    from gpu_pack import unpack

    checkpoint = unpack(args.pack / "model", Path(tempfile.mkdtemp()) / "tiny.en-fp16")
    if not args.skip_tests:
        budget = max(60.0, args.budget_s * 0.45)
        result["tests"] = run_tests(checkpoint, args.pack / "audio", budget, args.device)
        write()
    import transformers
    from bench_engines import load_clips_from

    from server.models.whisper import WhisperModel

    transformers.logging.set_verbosity_error()
    model = WhisperModel(
        str(checkpoint), "tiny.en (int8 pack)", device=args.device, dtype=args.dtype
    )
    clips = load_clips_from(args.pack / "audio")[: args.files or None]
    result["files"] = {"count": len(clips), "audio_s": round(sum(c.duration_s for c in clips), 1)}
    levels = [int(c) for c in args.levels.split(",") if c]
    result["benchmark"] = asyncio.run(benchmark(model, clips, levels, deadline))
    write()
    failed = result.get("tests", {}).get("failed", 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
