"""What both Whisper runtimes (`WhisperModel`'s generate path and the continuous engine's
`whisper_step`) read off the tokenizer and the logits, written once: special-token ids, the
language a prompt names, the no-speech probability and the confidence they report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def token_id(tokenizer: Any, token: str) -> int | None:
    """The id of a special token, or None when the tokenizer doesn't have it."""
    found = tokenizer.convert_tokens_to_ids(token)
    return None if found in (None, tokenizer.unk_token_id) else int(found)


def no_speech_id(tokenizer: Any) -> int | None:
    """Whisper's no-speech token (named <|nocaptions|> in the first checkpoints)."""
    return token_id(tokenizer, "<|nospeech|>") or token_id(tokenizer, "<|nocaptions|>")


def languages_by_id(generation_config: Any) -> dict[int, str]:
    """Language token id -> ISO code ("en"), from the generation config's lang_to_id."""
    lang_to_id = dict(getattr(generation_config, "lang_to_id", None) or {})
    return {int(i): tok.strip("<|>") for tok, i in lang_to_id.items()}


def language_in(tokens: Sequence[int], by_id: dict[int, str]) -> str | None:
    """The first language a token sequence (a prompt) names, if any."""
    return next((by_id[t] for t in tokens if t in by_id), None)


def no_speech_probs(logits_at_sot: torch.Tensor, no_speech: int | None) -> list[float]:
    """Softmax (in fp32, whatever the model's dtype) at <|startoftranscript|>, per row."""
    if no_speech is None:
        return [0.0] * logits_at_sot.shape[0]
    return [float(p) for p in torch.softmax(logits_at_sot.float(), dim=-1)[:, no_speech].tolist()]


def confidence(logprobs: Sequence[float]) -> float:
    """Geometric mean of the chosen tokens' probabilities; 0 when none is known."""
    finite = [lp for lp in logprobs if np.isfinite(lp)]
    return float(np.exp(np.mean(finite))) if finite else 0.0
