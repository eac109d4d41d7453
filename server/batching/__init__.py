"""Settings and a loaded model -> the batcher that feeds the model (the `engine` setting).

`continuous` (the default) is iteration-level batching of the decoder
(`server.batching.continuous`): windows join and leave the running decode batch between steps,
so nobody waits for the longest transcript of a batch. `generate` is the plain micro-batcher
(`server.batching.micro`) over the model's `run_batch`. A model without a continuous runtime
(the fake model of the tests) always gets the micro-batcher.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Executor

from server.batching.base import BatchStats, WindowBatcher
from server.batching.micro import BatcherConfig, MicroBatcher
from server.config import Settings
from server.models.base import SpeechModel

log = logging.getLogger(__name__)


def build_batcher(
    settings: Settings,
    model: SpeechModel,
    executor: Executor,
    on_batch: Callable[[BatchStats], None] | None = None,
    on_fatal: Callable[[Exception], None] | None = None,
) -> WindowBatcher:
    """The engine the settings ask for, running the model on `executor` (the model worker)."""
    s = settings
    if s.engine == "continuous" and model.supports_continuous:
        # Imported here: it needs torch, which the fake-model paths never load.
        from server.batching.continuous import ContinuousEngine, EngineConfig

        config = EngineConfig.from_settings(s)
        return ContinuousEngine(model, executor, config, on_batch, on_fatal)
    if s.engine == "continuous":
        log.info("%s has no continuous decoder: using the generate engine", type(model).__name__)
    return MicroBatcher(
        model.run_batch, executor, BatcherConfig.from_settings(s), on_batch, on_fatal
    )
