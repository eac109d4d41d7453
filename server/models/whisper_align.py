"""Word times for decoded Whisper windows, computed after decoding, batched.

`generate(return_token_timestamps=True)` keeps the cross-attention weights of every decoding
step and, at the end, aligns tokens to audio frames: the weights of the model's alignment
heads (`generation_config.alignment_heads`) over the decoder's inputs after the start tokens,
cropped to the window's real frames, normalized per frame, median-filtered, averaged over the
heads, then dynamic time warping (transformers' `_extract_token_timestamps`). The continuous
engine doesn't keep attention weights while it steps (its step is the hot loop); instead, when
sequences finish, one teacher-forced pass over their tokens recomputes the weights of the
alignment heads (causal attention gives each position the weights it had while decoding), up
to the last layer that has an alignment head, and the same filter and warping follow (ours,
step for step those of transformers, whose helpers are private). `group_words` turns token
times into words for both paths.

Only the model worker thread calls `token_times`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from server.models.base import Word
from server.models.shapes import padded_length

N_FRAMES = 3000  # mel frames in Whisper's 30 s window
TIME_PRECISION_S = 0.02  # one encoder frame (two mel frames)


def frames_of(duration_s: float) -> int:
    """The mel frames a window's audio fills (the rest is padding), as its attention mask."""
    return min(N_FRAMES, math.ceil(duration_s * 100))


@torch.inference_mode()
def alignment_weights(
    hf: Any, encoder_hidden: torch.Tensor, input_ids: torch.Tensor, heads: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Cross-attention weights (k, len(heads), T, frames) of the alignment heads for decoder
    inputs (k, T) (right-padded: causal attention keeps the padding out of real positions)
    over encoder_hidden (k, frames, d_model). The operation order is that of transformers'
    eager `WhisperAttention` (the path `generate` takes when it returns token times)."""
    decoder = hf.model.decoder
    t = input_ids.shape[1]
    positions = torch.arange(t, device=input_ids.device)
    hidden = decoder.embed_tokens(input_ids) + decoder.embed_positions.weight[positions]
    wanted: dict[tuple[int, int], torch.Tensor] = {}
    last = max(int(layer) for layer, _ in heads)
    for i, layer in enumerate(decoder.layers[: last + 1]):
        attn = layer.self_attn
        x = layer.self_attn_layer_norm(hidden)
        q, key, value = (_heads(attn, p(x)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        out = F.scaled_dot_product_attention(q * attn.scaling, key, value, is_causal=t > 1, scale=1)
        hidden = hidden + attn.out_proj(_merge(out))
        cross = layer.encoder_attn
        x = layer.encoder_attn_layer_norm(hidden)
        q = _heads(cross, cross.q_proj(x) * cross.scaling)
        key = _heads(cross, cross.k_proj(encoder_hidden))
        value = _heads(cross, cross.v_proj(encoder_hidden))
        weights = torch.softmax(q @ key.transpose(2, 3), dim=-1)
        for layer_index, head in heads:
            if int(layer_index) == i:
                wanted[(i, int(head))] = weights[:, int(head)]
        hidden = hidden + cross.out_proj(_merge(weights @ value))
        hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden))))
    return torch.stack([wanted[(int(i), int(h))] for i, h in heads], dim=1)


def token_times(
    hf: Any,
    encoder_hidden: torch.Tensor,
    inputs: list[list[int]],
    start_tokens: list[int],
    frames: list[int],
) -> list[list[float]]:
    """Per row: the time (seconds into the window) of each generated token, as `generate`
    returns them for its new tokens. `inputs[row]` are what the decoder was fed (start tokens,
    then every generated token but the last one: end-of-text, or the one that hit the limit);
    `start_tokens[row]` of them are start tokens; `frames[row]` mel frames hold audio."""
    gen = hf.generation_config
    # At a padded length (server.models.shapes): a new length per transcript would make a new
    # kernel per length on a CPU in bfloat16, kept for the life of the process.
    longest = padded_length(max(len(i) for i in inputs), hf.config.max_target_positions)
    padded = [i + [i[-1]] * (longest - len(i)) for i in inputs]
    ids = torch.as_tensor(padded, device=encoder_hidden.device)
    weights = alignment_weights(hf, encoder_hidden, ids, gen.alignment_heads)
    width = int(getattr(hf.config, "median_filter_width", 7))
    return [
        _warp(weights[row, :, start_tokens[row] : len(inputs[row]), : frames[row] // 2], width)
        for row in range(len(inputs))
    ]


def _warp(matrix: torch.Tensor, filter_width: int) -> list[float]:
    """`_extract_token_timestamps` for one row: matrix (heads, tokens, frames)."""
    if matrix.shape[1] == 0:
        return [0.0]  # only one token was generated: generate gives it time 0
    std = torch.std(matrix, dim=-2, keepdim=True, unbiased=False)
    mean = torch.mean(matrix, dim=-2, keepdim=True)
    matrix = median_filter((matrix - mean) / std, filter_width).mean(dim=0)
    text_indices, time_indices = dynamic_time_warping(-matrix.cpu().double().numpy())
    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    times = (time_indices[jumps] * TIME_PRECISION_S).tolist()
    # float32, as generate's timestamp tensor holds them
    return [float(np.float32(t)) for t in [*times, times[-1]]]


def median_filter(inputs: torch.Tensor, width: int) -> torch.Tensor:
    """transformers' `_median_filter`: the median of each `width` values along the last
    dimension, edges reflected; inputs shorter than half the width are returned as they are."""
    if width <= 0 or width % 2 != 1:
        raise ValueError(f"the median filter's width must be odd, not {width}")
    half = width // 2
    if inputs.shape[-1] <= half:
        return inputs
    padded = F.pad(inputs, (half, half, 0, 0), mode="reflect")
    return padded.unfold(-1, width, 1).sort()[0][..., half]  # sort: faster than median


def dynamic_time_warping(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' `_dynamic_time_warping`, same costs (float32), same tie rules, same path,
    computed one anti-diagonal at a time with numpy instead of one cell at a time in Python
    (100 tokens x 1500 frames: ~20 ms instead of ~0.5 s of the model worker's time).
    Diagonal-major layout: D[d, i] is cost[i, d - i], so each diagonal reads slices of the two
    before it."""
    n, m = matrix.shape
    cost = np.full((n + m + 1, n + 1), np.inf, dtype=np.float32)
    trace = np.full((n + m + 1, n + 1), -1, dtype=np.int8)
    cost[0, 0] = 0
    rows = np.arange(1, n + 1)
    # skewed[d, i] = matrix[i - 1, d - i - 1] where that cell exists
    d_index = rows[None, :] + np.arange(1, m + 1)[:, None]  # (m, n): i + j
    skewed = np.zeros((n + m + 1, n + 1))
    skewed[d_index, rows[None, :]] = matrix.T
    for d in range(2, n + m + 1):
        lo, hi = max(1, d - m), min(n, d - 1)
        if lo > hi:
            continue
        c0 = cost[d - 2, lo - 1 : hi]
        c1 = cost[d - 1, lo - 1 : hi]
        c2 = cost[d - 1, lo : hi + 1]
        pick0 = (c0 < c1) & (c0 < c2)
        pick1 = ~pick0 & (c1 < c0) & (c1 < c2)
        best = np.where(pick0, c0, np.where(pick1, c1, c2))
        cost[d, lo : hi + 1] = skewed[d, lo : hi + 1] + best
        trace[d, lo : hi + 1] = np.where(pick0, 0, np.where(pick1, 1, 2))
    i, j = n, m
    text, time = [], []
    while i > 0 or j > 0:
        text.append(i - 1)
        time.append(j - 1)
        step = 2 if i == 0 else 1 if j == 0 else int(trace[i + j, i])
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        elif step == 2:
            j -= 1
        else:
            raise RuntimeError(f"dynamic time warping: no path at ({i}, {j})")
    return np.array(text)[::-1], np.array(time)[::-1]


def group_words(
    tokenizer: Any,
    eos: int,
    tokens: Sequence[int],
    logprobs: Sequence[float],
    times: Sequence[float],
    duration_s: float,
) -> tuple[Word, ...]:
    """Group tokens into words (a word starts at a token that begins with a space); a word
    spans from its first token's time to the time of the token after its last."""
    spans: list[tuple[str, int, int]] = []  # text, first token index, last token index
    special = set(tokenizer.all_special_ids)
    for i, token in enumerate(tokens):
        if token in special or token >= eos:
            continue
        piece = tokenizer.decode([token])
        if not spans or piece.startswith(" "):
            spans.append((piece, i, i))
        else:
            text, first, _ = spans[-1]
            spans[-1] = (text + piece, first, i)
    words = []
    for text, first, last in spans:
        start = min(times[first], duration_s)
        end = min(times[min(last + 1, len(times) - 1)], duration_s)
        probs = [np.exp(lp) for lp in logprobs[first : last + 1]] or [0.0]
        words.append(Word(text.strip(), start, max(end, start), float(np.mean(probs))))
    return tuple(w for w in words if w.word)


def _heads(attn: Any, x: torch.Tensor) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, attn.num_heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, _, t, _ = x.shape
    return x.transpose(1, 2).reshape(b, t, -1)
