"""The check's parts in order (see `loadgen.gpu.check`), each gated on the time left and each
recording its own exception without stopping the rest."""

from __future__ import annotations

import argparse
import functools
import json
import math
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadgen.gpu.results import Results

WEIGHTS_NOTE = (
    "tiny.en weights stored as int8 per row (absmax/127, fp16 scales) and dequantized to fp16 "
    "on arrival: close to tiny.en, not equal to it"
)

# Seconds a part needs at least to be started (rough GPU figures; on a CPU dry run the budget
# decides what runs).
NEEDS_S = {"tests": 60.0, "engine": 10.0, "leaderboard": 20.0, "probe": 30.0}


class Check:
    def __init__(self, args: argparse.Namespace, results: Results, site: str | None) -> None:
        self.args, self.results, self.site = args, results, site
        self.deadline = results.started + args.budget_s
        self.references: dict[str, str] = {}
        self.reference_cpu: dict[str, str] = {}
        self.level_s = args.level_s

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def part(self, name: str, needs_s: float, fn: Callable[[], Any]) -> Any:
        """Run one part unless the budget is spent; its exception goes in the results."""
        if self.left_s() < needs_s:
            self.results.set(name, {"skipped": f"out of time ({self.left_s():.0f} s left)"})
            return None
        try:
            return fn()
        except Exception as e:
            self.results.set(
                name,
                {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]},
            )
            self.results.fail(f"{name}: {type(e).__name__}: {e}")
            return None

    def run(self) -> int:
        from loadgen.gpu import facts

        args, results = self.args, self.results
        # SIGTERM (a limit reached) unwinds like an exception: servers stop, results stay.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        results.set(
            "flags", {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        )
        results.set("weights", WEIGHTS_NOTE)
        env = self.part("environment", 0, lambda: facts.environment(args.pack, self.site))
        results.set("environment", env)
        if args.device.startswith("cuda") and not (env or {}).get("gpu", {}).get("cuda_available"):
            results.set("status", "skipped")
            results.set("skipped", "no CUDA device: nothing measured (--device cpu for a dry run)")
            return 0
        import transformers

        transformers.logging.set_verbosity_error()
        self.checkpoint = self.part("unpack", 0, self.unpack)
        if self.checkpoint is None:
            return results.finish()
        self.items = self.part("files", 0, self.load_files) or []
        if not args.skip_tests:
            self.part("tests", NEEDS_S["tests"], self.tests)
        for dtype in args.dtypes:
            self.part(f"engine_{dtype}", NEEDS_S["engine"], functools.partial(self.engine, dtype))
        self.part("leaderboard", NEEDS_S["leaderboard"], self.leaderboard)
        self.part("sweep", 0, self.sweep)
        for name in args.probes:
            self.part(f"probe_{name}", NEEDS_S["probe"], functools.partial(self.probe, name))
        self.part("sizing", -math.inf, self.sizing)  # arithmetic: always
        return results.finish()

    # -- parts --------------------------------------------------------------------------
    def unpack(self) -> Path:
        from loadgen.gpu.pack import REFERENCE, unpack

        reference = self.args.pack / REFERENCE
        if reference.exists():
            self.reference_cpu = json.loads(reference.read_text())
        else:
            self.results.fail(f"no {REFERENCE} in the pack: no agreement with the CPU")
        return unpack(self.args.pack / "model", Path(tempfile.mkdtemp()) / "tiny.en-fp16")

    def load_files(self) -> list[Any]:
        from loadgen.dataset import load_dataset

        items = list(load_dataset(str(self.args.pack / "audio")).items)
        items = items[: self.args.files or None]
        self.references = {i.id: i.reference or "" for i in items}
        self.results.set(
            "files", {"count": len(items), "audio_s": round(sum(i.audio_s for i in items), 1)}
        )
        return items

    def tests(self) -> None:
        from loadgen.gpu import gputests

        limit = min(self.args.budget_s * self.args.tests_share, self.left_s() - 30)
        report = gputests.run_tests(
            self.checkpoint,
            self.args.pack / "audio",
            self.args.device,
            limit,
            dtypes=self.args.dtypes,
            clips=self.args.files,
            progress=lambda so_far: self.results.set("tests", so_far),
        )
        self.results.set("tests", report)
        why = gputests.failure(report)
        if why:
            self.results.fail(why)

    def engine(self, dtype: str) -> None:
        import torch

        from loadgen.gpu.inproc import probe
        from server.models.whisper import WhisperModel

        model = WhisperModel(str(self.checkpoint), "tiny.en (int8 pack)", self.args.device, dtype)
        row = probe(model.model, **self.probe_size())
        self.results.set(f"engine_{dtype}", {"model": "tiny.en (pack)", **row})
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def leaderboard(self) -> None:
        from loadgen.gpu.inproc import leaderboard

        cpu = self.args.device == "cpu"
        row = leaderboard(
            str(self.checkpoint),
            self.items,
            self.args.device,
            dtype=self.args.leaderboard_dtype,
            min_files=len(self.items) if cpu else 128,
        )
        row.update(self.quality(row.pop("texts")))
        self.results.set("leaderboard", row)

    def quality(self, texts: dict[str, str]) -> dict[str, Any]:
        from loadgen.gpu.quality import agreement

        return agreement(
            texts, self.reference_cpu, self.references, self.args.pack / "model" / "normalizer.json"
        )

    def sweep(self) -> None:
        from loadgen.gpu import sweep

        args, results = self.args, self.results
        configs, note = sweep.configurations(args.engines, args.dtypes, args.compile)
        results.set(
            "sweep",
            {
                "configurations": [c.name for c in configs],
                "compile_note": note,
                "levels": args.levels,
                "level_s": args.level_s,
                "rows": [],
            },
        )
        # batches and slots up to the highest level (64 on the GPU; warm-up runs that batch)
        most = min(64, max(args.levels))
        servers = [sweep.start(c, self.checkpoint, args.device, most) for c in configs]
        try:
            for server in servers:
                sweep.wait_serving(server)
                if server.error:
                    results.add_row("sweep", {"config": server.config.name, "error": server.error})
                    results.fail(f"sweep: {server.config.name} did not start")
            live = [s for s in servers if not s.error]
            reserve = NEEDS_S["probe"] * len(args.probes) + 10
            self.level_s = sweep.level_seconds(
                args.level_s, self.left_s() - reserve, len(live) * len(args.levels)
            )
            results.doc["sweep"]["level_s_used"] = round(self.level_s, 1)
            texts: dict[str, dict[str, str]] = {s.config.name: {} for s in live}
            for i, concurrency in enumerate(args.levels):
                for server in sweep.rotate(live, i):
                    row = self.level(server, concurrency, texts[server.config.name])
                    results.add_row("sweep", row)
            results.doc["sweep"]["agreement"] = {
                name: self.quality(t) for name, t in texts.items() if t
            }
            results.write()
        finally:
            for server in servers:
                server.stop()

    def level(self, server: Any, concurrency: int, texts: dict[str, str]) -> dict[str, Any]:
        from loadgen.gpu import sweep

        name = server.config.name
        if self.left_s() < self.level_s + 5:
            return {"config": name, "concurrency": concurrency, "skipped": "out of time"}
        if server.process.poll() is not None:
            self.results.fail(f"sweep: {name} server exited ({server.process.returncode})")
            return {
                "config": name,
                "concurrency": concurrency,
                "error": f"server exited: {server.log_tail()}",
            }
        try:
            with sweep.Sampler(server.process.pid, self.args.device.startswith("cuda")) as s:
                level = sweep.closed_loop(server.channel, self.items, concurrency, self.level_s)
        except Exception as e:
            self.results.fail(f"sweep: {name} at {concurrency}: {type(e).__name__}: {e}")
            return {"config": name, "concurrency": concurrency, "error": f"{type(e).__name__}: {e}"}
        for key, text in level.texts.items():
            texts.setdefault(key, text)
        row = {**sweep.level_row(server.config, concurrency, level), **s.summary()}
        if set(level.codes) - {"OK"}:
            self.results.fail(f"sweep: {name} at {concurrency}: {dict(level.codes)}")
        return row

    def probe_size(self) -> dict[str, Any]:
        """On a CPU dry run, a token amount of work: the code path is what is being tried."""
        if self.args.device == "cpu":
            return {"actives": (1, 8), "steps": 2, "windows": 1}
        return {}

    def probe(self, name: str) -> None:
        import torch

        from loadgen.gpu import sizing
        from loadgen.gpu.inproc import probe, random_model

        dtype = self.args.probe_dtype
        model = random_model(sizing.CONFIGS[name], self.args.device, dtype)
        try:
            row = probe(model, **self.probe_size())
        finally:
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        expected = sizing.slot_bytes(sizing.CONFIGS[name], dtype)
        row.update(model=f"{name} (random weights)", slot_bytes_formula=expected)
        self.results.set(f"probe_{name}", row)

    def sizing(self) -> None:
        from loadgen.gpu import sizing

        measured = {}
        for key, section in self.results.doc.items():
            if key.startswith("probe_") and "slot_cache_bytes_per_slot" in section:
                measured[f"{key.removeprefix('probe_')}/{section['dtype']}"] = section[
                    "slot_cache_bytes_per_slot"
                ]
        gpu = (self.results.doc.get("environment") or {}).get("gpu", {})
        this_card = {}
        if gpu.get("memory_gib"):
            this_card = {
                model: sizing.recommended_max_active(
                    model, gpu["memory_gib"], "float16", measured.get(f"{model}/float16")
                )
                for model in sizing.CONFIGS
            }
        deployed = sizing.check_deployed(measured)
        self.results.set(
            "sizing",
            {
                "this_card_max_active_fp16": this_card,
                "deployed": deployed,
                "measured_slot_bytes": measured,
            },
        )
        for row in deployed:
            if not row["ok"]:
                self.results.fail(
                    f"sizing: {row['card']} --max-active {row['max_active']} "
                    f"doesn't fit {row['model']}"
                )
