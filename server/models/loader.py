"""Settings -> a loaded, warmed-up SpeechModel. Runs on the model worker thread (server.app)."""

from __future__ import annotations

import logging
import os

from server.config import Settings
from server.models.base import SpeechModel

log = logging.getLogger(__name__)


def load_model(settings: Settings) -> SpeechModel:
    """Provision (built-in names are converted once into the cache), load, and warm up."""
    import torch
    import transformers

    from server.checkpoints.hub import ensure_hub_model_available
    from server.checkpoints.provision import BUILTIN_MODELS, resolve_model
    from server.models.whisper import WhisperModel

    # The intra-op pool is process-wide; set it here, on the thread that will run the model.
    torch.set_num_threads(settings.num_threads or os.cpu_count() or 1)
    # generate() warns on every call about settings we choose on purpose; keep logs readable.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if settings.compile != "off":
        from server.models.static_step import persist_compiled

        persist_compiled(str(settings.cache_dir))
    resolved = resolve_model(settings.model, settings.cache_dir)
    if resolved.source == "hub":  # fail in seconds when offline, not after minutes of retries
        ensure_hub_model_available(resolved.name_or_path, tuple(BUILTIN_MODELS))
    model = WhisperModel(
        resolved.name_or_path,
        model_id=settings.model,
        device=settings.device,
        dtype=settings.dtype,
        max_new_tokens=settings.max_new_tokens,
    )
    if settings.warmup:
        model.warmup([1, settings.max_batch_size])
    return model
