"""How many windows each card can decode at once (`--max-active`), from the memory the
continuous engine's slot caches take. Pure arithmetic: the GPU check feeds it the slot-cache
bytes it measured, the unit tests check the per-card settings in deploy/ against it.

Per slot, `server.models.whisper_step.BatchedDecoder` keeps, for every decoder layer, keys and
values of self-attention (max_target_positions = 448 positions) and of cross-attention
(max_source_positions = 1500 frames), d_model wide each:
    layers x 2 x (448 + 1500) x d_model x bytes per element.
large-v3 in fp16: 32 x 2 x 1948 x 1280 x 2 B = 0.30 GiB a slot, 19 GiB at 64 active.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30
_COMMON = {"max_source_positions": 1500, "max_target_positions": 448}
# Whisper configurations (transformers' WhisperConfig fields; no weights needed).
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny.en": {"d_model": 384, "encoder_layers": 4, "decoder_layers": 4,
                "encoder_attention_heads": 6, "decoder_attention_heads": 6,
                "encoder_ffn_dim": 1536, "decoder_ffn_dim": 1536, "num_mel_bins": 80,
                "vocab_size": 51864, "params": 39e6},
    "base": {"d_model": 512, "encoder_layers": 6, "decoder_layers": 6,
             "encoder_attention_heads": 8, "decoder_attention_heads": 8,
             "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048, "num_mel_bins": 80,
             "vocab_size": 51865, "params": 74e6},
    "large-v3": {"d_model": 1280, "encoder_layers": 32, "decoder_layers": 32,
                 "encoder_attention_heads": 20, "decoder_attention_heads": 20,
                 "encoder_ffn_dim": 5120, "decoder_ffn_dim": 5120, "num_mel_bins": 128,
                 "vocab_size": 51866, "params": 1550e6},
    "large-v3-turbo": {"d_model": 1280, "encoder_layers": 32, "decoder_layers": 4,
                       "encoder_attention_heads": 20, "decoder_attention_heads": 20,
                       "encoder_ffn_dim": 5120, "decoder_ffn_dim": 5120, "num_mel_bins": 128,
                       "vocab_size": 51866, "params": 809e6},
}  # fmt: skip
for _config in CONFIGS.values():
    _config.update(_COMMON)
# Usable memory per card, GiB (what the driver reports: 16 GB is 14.6-15.9 GiB).
CARDS_GIB = {"t4": 14.6, "v100": 15.8, "a10g": 22.0, "l4": 22.0, "a100": 39.4,
             "h100": 79.2, "h200": 139.8}  # fmt: skip
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Kept free for the encoder's activations, the allocator's slack and the CUDA context.
HEADROOM = 0.15
RESERVE_GIB = 2.0


def slot_bytes(config: dict[str, Any], dtype: str) -> int:
    """Slot-cache bytes of one decoding window (see the module docstring)."""
    positions = config["max_target_positions"] + config["max_source_positions"]
    return config["decoder_layers"] * 2 * positions * config["d_model"] * DTYPE_BYTES[dtype]


def weights_bytes(config: dict[str, Any], dtype: str) -> int:
    return int(config["params"] * DTYPE_BYTES[dtype])


def usable_bytes(card_gib: float) -> float:
    return card_gib * (1 - HEADROOM) * GIB - RESERVE_GIB * GIB


def recommended_max_active(
    model: str, card_gib: float, dtype: str = "float16", per_slot: int | None = None
) -> int:
    """The most windows decoding at once whose slot caches fit beside the weights (capped at
    Settings' bound, 1024); 0 where even the weights don't fit."""
    config = CONFIGS[model]
    per_slot = per_slot or slot_bytes(config, dtype)
    room = usable_bytes(card_gib) - weights_bytes(config, dtype)
    return max(0, min(1024, math.floor(room / per_slot)))


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def deployed_settings(root: Path = ROOT) -> list[dict[str, Any]]:
    """Per card: the model, dtype and --max-active of deploy/k8s (docker-compose reads the same
    files through env_file; its multi-GPU replica defaults to the A100 row)."""
    common = read_env(root / "deploy" / "k8s" / "base" / "common.env")
    rows = []
    for card in sorted(CARDS_GIB):
        env_file = root / "deploy" / "k8s" / "overlays" / card / "server.env"
        if not env_file.exists():
            continue
        env = {**common, **read_env(env_file)}
        rows.append({
            "card": card, "model": env.get("WHISPER_GRPC_MODEL", "tiny.en"),
            "dtype": env.get("WHISPER_GRPC_DTYPE", "float16"),
            "max_active": int(env.get("WHISPER_GRPC_MAX_ACTIVE", "16")),
        })  # fmt: skip
    return rows


def check_deployed(
    measured_slot_bytes: dict[str, int] | None = None, root: Path = ROOT
) -> list[dict[str, Any]]:
    """Each card's deployed --max-active against what fits, for its model and for the large
    models (which that setting would not fit)."""
    measured = measured_slot_bytes or {}
    out = []
    for row in deployed_settings(root):
        dtype = row["dtype"] if row["dtype"] in DTYPE_BYTES else "float16"
        fits = {
            model: recommended_max_active(
                model, CARDS_GIB[row["card"]], dtype, measured.get(f"{model}/{dtype}")
            )
            for model in CONFIGS
        }
        model_fit = fits.get(row["model"])
        out.append({**row, "fits_max_active": fits,
                    "ok": model_fit is None or row["max_active"] <= model_fit})  # fmt: skip
    return out
