"""What the check ran on and with: commit, GPU, driver, CPU, and the versions (and files) of the
modules actually imported, including whether they came from the pack's wheels."""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# module -> distribution whose version to record
MODULES = {
    "torch": "torch",
    "transformers": "transformers",
    "numpy": "numpy",
    "grpc": "grpcio",
    "google.protobuf": "protobuf",
    "google.longrunning": "googleapis-common-protos",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "soundfile": "soundfile",
    "soxr": "soxr",
    "safetensors": "safetensors",
    "tokenizers": "tokenizers",
    "psutil": "psutil",
    "pynvml": "nvidia-ml-py",
    "typing_extensions": "typing-extensions",
    "pytest": "pytest",
}


def _run(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def imported_versions(site: str | None) -> dict[str, Any]:
    """Each module as this interpreter imports it: version, folder, from the pack or not."""
    out: dict[str, Any] = {}
    for module, dist in MODULES.items():
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # a module that fails to import is a finding, not a crash
            out[module] = {"error": f"{type(e).__name__}: {e}"}
            continue
        where = str(Path(getattr(mod, "__file__", None) or next(iter(mod.__path__))).parent)
        try:
            version: str | None = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = getattr(mod, "__version__", None)
        out[module] = {
            "version": str(getattr(mod, "__version__", None) or version),
            "from_pack": bool(site) and where.startswith(str(site)),
            "path": where,
        }
    return out


def cpu() -> dict[str, Any]:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"model": model or platform.processor(), "cores": os.cpu_count(), "usable": usable}


def gpu() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda}
    smi = _run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    )
    if smi:
        name, driver, memory = (s.strip() for s in smi.splitlines()[0].split(","))
        out.update(smi_name=name, driver=driver, smi_memory=memory)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(
            name=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
        )
    return out


def commit(pack: Path) -> dict[str, Any]:
    """The tree's commit (git, where .git travelled) and the one the pack was made at."""
    tree = pack / "tree.json"
    return {
        "git": _run(["git", "rev-parse", "HEAD"]),
        "dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"])),
        "pack": tree.read_text().strip() if tree.exists() else None,
    }


def environment(pack: Path, site: str | None) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "commit": commit(pack),
        "cpu": cpu(),
        "gpu": gpu(),
        "pack_wheels": {"used": bool(site), "site": site},
        "imported": imported_versions(site),
    }
