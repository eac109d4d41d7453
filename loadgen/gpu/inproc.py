"""In-process measurements on the device: the leaderboard-style `generate` row, and the engine
probes (encoder ms per 30 s window, decoder ms per step at 1/8/32/64 active, slot-cache memory)
on the pack's tiny.en and on random-weight large-v3 / large-v3-turbo built from their
configurations on the device (no weights travel). Only the check's main thread runs these."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

ACTIVES = (1, 8, 32, 64)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_ms(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    fn()  # warm-up: kernels, allocator
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - started) * 1000 / repeat


def _peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def random_model(config: dict[str, Any], device: str, dtype: str) -> Any:
    """A WhisperForConditionalGeneration with random weights, built on `device` directly."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    fields = {k: v for k, v in config.items() if k != "params"}
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])
    try:
        with torch.device(device):
            model = WhisperForConditionalGeneration(WhisperConfig(**fields))
    finally:
        torch.set_default_dtype(default)
    return model.eval()


@torch.inference_mode()
def probe(
    hf: Any, actives: tuple[int, ...] = ACTIVES, steps: int = 16, windows: int = 8
) -> dict[str, Any]:
    """Encoder ms per window (a batch of `windows`), decoder ms per step at each number of
    active windows (`BatchedDecoder`, the continuous engine's step), slot-cache GiB."""
    from server.models.whisper_step import BatchedDecoder

    param = next(hf.parameters())
    device, dtype = param.device, param.dtype
    config = hf.config
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    features = torch.randn(windows, config.num_mel_bins, 3000, device=device, dtype=dtype)
    encoder_ms = _timed_ms(lambda: hf.model.encoder(features), device, repeat=2) / windows
    capacity = max(actives)
    decoder = BatchedDecoder(hf, capacity, config.max_target_positions)
    cache_bytes = sum(
        t.numel() * t.element_size()
        for t in decoder.self_k + decoder.self_v + decoder.cross_k + decoder.cross_v
    )
    hidden = torch.randn(1, config.max_source_positions, config.d_model, device=device, dtype=dtype)
    for slot in range(capacity):
        decoder.load_cross(slot, hidden)
    prompt = torch.full((capacity, 4), 50257, device=device, dtype=torch.long)
    decoder.prefill(0, prompt)
    step_ms = {}
    for n in actives:
        ids = torch.full((n,), 50257, device=device, dtype=torch.long)

        def step(ids: torch.Tensor = ids, n: int = n) -> None:
            decoder.step(ids)
            decoder.advance(n)

        step_ms[str(n)] = round(_timed_ms(step, device, repeat=steps), 2)
    return {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "encoder_ms_per_window": round(encoder_ms, 2),
        "encoder_batch": windows,
        "decode_ms_per_step": step_ms,
        "steps_timed": steps,
        "slot_cache_gib": round(cache_bytes / 2**30, 3),
        "slots": capacity,
        "slot_cache_bytes_per_slot": cache_bytes // capacity,
        "peak_allocated_mib": _peak_mib(device),
    }


def _samples(item: Any) -> np.ndarray:
    import soundfile as sf

    samples, rate = sf.read(io.BytesIO(item.data), dtype="float32")
    if rate != 16_000:
        import soxr

        samples = soxr.resample(samples, rate, 16_000)
    return np.asarray(samples, dtype=np.float32)


@torch.inference_mode()
def leaderboard(
    checkpoint: str,
    items: list[Any],
    device: str,
    dtype: str = "bfloat16",
    batch: int = 64,
    min_files: int = 128,
) -> dict[str, Any]:
    """As the Open ASR Leaderboard's transformers harness: `generate` in-process, bf16, batch
    64, log-mel features computed on the device, files sorted by length (longest first), one
    warm-up batch. The files repeat to make at least `min_files`; RTFx = audio s / wall s."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(checkpoint)
    model: Any = WhisperForConditionalGeneration.from_pretrained(
        checkpoint, dtype=DTYPES[dtype], attn_implementation="sdpa"
    )
    model = model.to(device).eval()
    audio = [(item, _samples(item)) for item in items]
    repeat = -(-min_files // len(audio))
    work = sorted(audio * repeat, key=lambda a: -len(a[1]))
    dev = torch.device(device)

    def run(chunk: list[tuple[Any, np.ndarray]]) -> list[str]:
        inputs = processor.feature_extractor(
            [s for _, s in chunk], sampling_rate=16_000, return_tensors="pt", device=device
        )
        features = inputs.input_features.to(dev, DTYPES[dtype])
        out = model.generate(features, max_new_tokens=440)
        return list(processor.batch_decode(out, skip_special_tokens=True))

    run(work[:batch])  # warm-up
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    texts: dict[str, str] = {}
    started = time.perf_counter()
    for start in range(0, len(work), batch):
        chunk = work[start : start + batch]
        for (item, _), text in zip(chunk, run(chunk), strict=True):
            texts.setdefault(item.id, text.strip())
    _sync(dev)
    wall = time.perf_counter() - started
    audio_s = sum(len(s) for _, s in work) / 16_000
    return {
        "name": "leaderboard-style generate",
        "dtype": dtype,
        "batch": batch,
        "features_on": device,
        "sorted": "longest first",
        "warmup_batches": 1,
        "files": len(work),
        "audio_s": round(audio_s, 1),
        "wall_s": round(wall, 2),
        "rtfx": round(audio_s / wall, 1),
        "peak_allocated_mib": _peak_mib(dev),
        "texts": texts,
    }
