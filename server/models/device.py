"""Which device and dtype the model runs in, and what the accelerator's failures mean.

- `resolve_device`/`choose_dtype`: `--device auto` is CUDA when torch sees a GPU; `--dtype auto`
  is float16 on a GPU, bfloat16 on a CPU with native bf16 matrix instructions (AMX or
  AVX512-BF16: about 1.6-3x fp32 for Whisper's matmuls at the same WER), float32 on other
  CPUs. The choice comes with its reason, for the log line and `GetServerInfo`.
- `device_errors()`: the one place that reads torch's exceptions. Out of memory becomes
  `DeviceOutOfMemoryError` (the batchers retry smaller pieces); a sticky CUDA error (a
  device-side assert, an illegal memory access: the context is unusable until the process
  exits) becomes `DeviceFaultError` (the server stops taking work and exits non-zero so the
  orchestrator replaces it). Everything else passes through unchanged.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from server.errors import DeviceFaultError, DeviceOutOfMemoryError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# /proc/cpuinfo flags of x86 CPUs whose matrix units run bf16 natively (oneDNN uses them).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# Messages of CUDA errors after which the context is unusable (CUDA's "sticky" errors).
_STICKY_CUDA = (
    "device-side assert", "illegal memory access", "unspecified launch failure",
    "misaligned address", "illegal instruction", "uncorrectable ecc", "an illegal",
    "cuda error: unknown error", "hardware stack error", "launch timed out",
)  # fmt: skip


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    reason: str  # why this dtype: shown in the log and in GetServerInfo.dtype_reason

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} asked for, but torch sees no CUDA device")
    return torch.device(device)


def cpu_bf16_support() -> str | None:
    """The native bf16 matrix instructions this CPU has ("amx_bf16", "avx512_bf16"), or None.
    Asks torch first (what its kernels will use), then the kernel's CPU flags."""
    probes = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    for flag, probe in probes:
        check = getattr(torch.cpu, probe, None)
        with contextlib.suppress(Exception):
            if check is not None and check():
                return flag
    return _cpuinfo_bf16_flag(Path("/proc/cpuinfo"))


def _cpuinfo_bf16_flag(cpuinfo: Path) -> str | None:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return next((f for f in BF16_CPU_FLAGS if f in flags), None)
    return None


def choose_dtype(dtype: str, device: torch.device, bf16_cpu: str | None = None) -> Precision:
    """The dtype for `--dtype` on `device`; `bf16_cpu` is `cpu_bf16_support()`'s answer."""
    if dtype != "auto":
        return Precision(DTYPES[dtype], f"--dtype {dtype}")
    if device.type == "cuda":
        return Precision(torch.float16, "auto: float16 on a GPU")
    if device.type == "cpu" and bf16_cpu:
        return Precision(torch.bfloat16, f"auto: this CPU has native bf16 ({bf16_cpu})")
    if device.type == "cpu":
        return Precision(torch.float32, "auto: this CPU has no native bf16 (amx/avx512_bf16)")
    return Precision(torch.float32, f"auto: float32 on {device.type}")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError | DeviceOutOfMemoryError):
        return True
    text = str(err).lower()
    # MPS and the CPU allocator raise plain RuntimeErrors.
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def is_device_fault(err: BaseException) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if accelerator_error is not None and isinstance(err, accelerator_error):
        return not is_out_of_memory(err)
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (
        any(s in text for s in _STICKY_CUDA) or text.startswith("cuda error")
    )


@contextlib.contextmanager
def device_errors(device: torch.device, what: str) -> Iterator[None]:
    """Translate the accelerator's failures in the block into the server's error classes."""
    try:
        yield
    except (DeviceOutOfMemoryError, DeviceFaultError):
        raise
    except Exception as err:
        if is_out_of_memory(err):
            if device.type == "cuda":
                torch.cuda.empty_cache()  # give the retry in smaller pieces the freed blocks
            raise DeviceOutOfMemoryError(f"{device} ran out of memory in {what}") from err
        if is_device_fault(err):
            raise DeviceFaultError(f"{device} failed in {what}: {_first_line(err)}") from err
        raise


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
