"""The few lengths the decoder's variable-length passes run at.

On a CPU, each bfloat16 matrix product of a new shape makes oneDNN build a kernel for it and
keep it: measured here, 0.25-0.7 MiB per shape (float32 products keep almost nothing). A server
whose passes ran at every length it met grew with the variety of lengths it had seen: a
stream's draft has a new length at every interim, a word-time pass one per transcript length.
Padded to a handful of lengths, those kernels are built once, and memory stays flat."""

from __future__ import annotations

EXACT_PREFILL = 4
"""Passes of up to this many tokens (every prompt without a draft) run at their own length, as
`generate`'s first pass does, so that one window alone still gets `generate`'s logits bit for
bit."""


def padded_length(tokens: int, max_positions: int) -> int:
    """The length a causal pass over `tokens` runs at: itself up to EXACT_PREFILL, else the next
    power of two (8, 16 ... at most `max_positions`). Causal attention keeps the padding out of
    the real positions, so padding changes what they compute only by float summation order."""
    if tokens <= EXACT_PREFILL:
        return tokens
    return min(1 << (tokens - 1).bit_length(), max(tokens, max_positions))


KEY_BLOCK = 64
"""Eager decode steps that attend with plain products (`server.models.attention`: low
precision on a CPU) attend over the cache in blocks of this many positions: 7 lengths for
Whisper's 448, instead of one per token position (steps of 1 to 8 rows met 448 x 8 shapes, and
measured here those kernels grew a process by 880 MiB)."""


def padded_keys(longest: int, max_positions: int) -> int:
    """The cache length an eager step attends over when the filled length is `longest`."""
    return min(max_positions, -(-longest // KEY_BLOCK) * KEY_BLOCK)
