"""A CPU stand-in for a GPU's device checks: the placement bugs CUDA would raise on.

On a GPU, a tensor made without `device=` is born on the CPU and fails the first op that meets
the model's CUDA tensors. On a CPU-only machine every tensor is on the CPU, so that bug is
invisible. `DeviceGuard` makes it visible again: inside it, every tensor factory called from the
server's own code (`server/`) that names no device makes its tensor on the `meta` device, and
every op checks that all its tensor arguments share one device, as CUDA kernels do. A model on
the CPU then behaves as a model on a GPU would: only tensors placed on purpose (`device=`,
`*_like`, `.new_*`, `.to(model device)`) meet it without error.

Only the server's factories are redirected: transformers keeps some bookkeeping tensors on the
host on purpose (`generate`'s seek positions), which is right on a GPU too.

The guard is per thread (torch function modes are thread-local): `GuardedExecutor` runs every
job of the model worker inside one.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._pytree import tree_flatten

SERVER_DIR = str(Path(__file__).resolve().parents[1] / "server")
_FACTORIES = _device_constructors()
# Ops that take tensors on several devices on purpose (copies between devices).
_CROSS_DEVICE = {"to", "copy_", "cpu", "cuda", "__get__", "__set__", "numpy", "tolist", "item"}


class PlacementError(RuntimeError):
    """An op met tensors on different devices (what CUDA reports as 'Expected all tensors
    to be on the same device')."""


def _caller_in(watched: tuple[str, ...]) -> bool:
    """Whether the nearest caller outside torch and this module lives under `watched`."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if path != __file__ and f"{os.sep}torch{os.sep}" not in path:
            return path.startswith(watched)
        frame = frame.f_back  # type: ignore[assignment]
    return False


class _Placement(TorchFunctionMode):
    def __init__(self, watched: tuple[str, ...]) -> None:
        super().__init__()
        self.watched = watched

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _FACTORIES:
            if kwargs.get("device") is None and _caller_in(self.watched):
                kwargs["device"] = torch.device("meta")
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name not in _CROSS_DEVICE:
            leaves, _ = tree_flatten((args, kwargs))
            devices = {t.device for t in leaves if isinstance(t, torch.Tensor)}
            if len(devices) > 1:
                raise PlacementError(
                    f"{getattr(func, '__qualname__', func)} got tensors on "
                    f"{sorted(str(d) for d in devices)}: a tensor was made without device="
                )
        return func(*args, **kwargs)


class DeviceGuard:
    """Context manager: the server's factories without a device make meta tensors; every op
    checks that its tensors share a device."""

    def __init__(self, watched: tuple[str, ...] = (SERVER_DIR,)) -> None:
        self.watched = watched

    def __enter__(self) -> DeviceGuard:
        self._mode = _Placement(self.watched)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


class GuardedExecutor(ThreadPoolExecutor):
    """One worker thread (the model worker) that runs each job inside a `DeviceGuard`."""

    def __init__(self) -> None:
        super().__init__(1, thread_name_prefix="guarded-model-worker")
        self.jobs = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def guarded() -> Any:
            with self._lock:
                self.jobs += 1
            with DeviceGuard():
                return fn(*args, **kwargs)

        return super().submit(guarded)
