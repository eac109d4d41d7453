"""Language detection for the continuous engine, as transformers' `detect_language` does it.

`generate` detects the language of each window with one decoder pass at
<|startoftranscript|> over its encoder output, keeps only the language tokens' logits and
takes the argmax. The continuous engine already runs that pass (its logits give the no-speech
probability), so detection here costs no more than reading the language tokens' logits of
the joining windows, batched; the chosen language token then takes its place in the prompt.
"""

from __future__ import annotations

import torch

DETECT = -1  # placeholder for the language token in a prompt whose language is detected


def detect_languages(logits_at_sot: torch.Tensor, language_ids: list[int]) -> list[int]:
    """logits_at_sot (rows, vocab): the decoder's logits after <|startoftranscript|>. Returns
    the most likely language token id per row (ties to the lowest id, as argmax does in
    `detect_language`, whose non-language logits are -inf)."""
    ids = torch.as_tensor(sorted(language_ids), device=logits_at_sot.device)
    best = logits_at_sot.index_select(-1, ids).argmax(dim=-1)
    return [int(i) for i in ids[best].tolist()]


def with_language(prompt: list[int], language: int) -> list[int]:
    """The prompt with its DETECT placeholder replaced by `language`."""
    return [language if t == DETECT else t for t in prompt]
