"""Attention for the decode step and cross-attention, where torch's fused kernel is not the
fastest choice (see `attend`)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

# Off: SDPA everywhere (the tests that hold the engine's bookkeeping to `generate`'s exact
# low-precision tokens switch it off; the numerics of this path have a test of their own).
PLAIN_LOW_PRECISION_ON_CPU = True


def attend(
    q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention without a causal mask (a decode step's one query, or cross-attention), `q`
    already scaled; `mask` (bool, True = may attend) hides unfilled cache positions.

    In bf16/fp16 on a CPU, torch's fused SDPA (the flash kernel) costs 4-7x the plain product
    for a single query against Whisper's 1,500 encoder frames (tiny.en, 2 cores: 490 vs 127 us
    a call at one row, 4.1 ms vs 0.6 ms at eight): it was over half of a bf16 step. There the
    scores are one small matmul and the softmax runs in fp32. Everywhere else (fp32, where
    `generate`'s exact tokens are the contract, and on GPUs) SDPA stays."""
    if not plain_products(q.device, q.dtype):
        return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=1.0)
    scores = torch.matmul(q, key.transpose(-1, -2)).float()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(value.dtype), value)


def plain_products(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `attend` runs plain matrix products (low precision on a CPU) rather than SDPA.
    There each new shape of a product builds a oneDNN kernel that stays (server.models.shapes),
    so the eager step attends over blocks of cache positions; SDPA keeps exact lengths, which
    keeps one window's tokens bit for bit those of `generate` in every dtype."""
    return PLAIN_LOW_PRECISION_ON_CPU and device.type == "cpu" and dtype != torch.float32
