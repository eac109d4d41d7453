"""A random-weight Whisper small enough for unit tests, behind the real `WhisperModel`.

It has tiny.en's tokenizer, feature extractor and generation config (so prompts, suppress
rules, word-time alignment heads and language tokens are the real ones) and a 2-layer, 64-wide
network with random weights, so every code path of `WhisperModel` and the continuous runtime
runs in milliseconds per step. Its transcripts are nonsense; tests compare paths with each
other, never with a reference text.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

# Files of a transformers Whisper checkpoint besides the weights and configs.
_PROCESSOR_FILES = (
    "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
    "merges.txt", "normalizer.json", "special_tokens_map.json", "added_tokens.json",
)  # fmt: skip
# tiny.en's ids of these tokens (its vocabulary has them all).
LANGUAGES = {"<|en|>": 50258, "<|fr|>": 50264}
TASKS = {"transcribe": 50358, "translate": 50357}


def make_random_checkpoint(tiny_en: Path, out: Path, multilingual: bool = False) -> Path:
    """Write a random-weight checkpoint into `out` using tiny.en's processor files."""
    out.mkdir(parents=True, exist_ok=True)
    for name in _PROCESSOR_FILES:
        if (tiny_en / name).exists():
            shutil.copy(tiny_en / name, out / name)
    config = WhisperConfig.from_pretrained(tiny_en)
    config.update(
        {
            "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
            "encoder_attention_heads": 4, "decoder_attention_heads": 4,
            "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
        }
    )  # fmt: skip
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    gen = GenerationConfig.from_pretrained(tiny_en)
    gen.alignment_heads = [[0, 0], [1, 1], [1, 3]]  # heads that exist in 2 x 4
    # Random weights favour special tokens; suppressing them gives text tokens (and words).
    gen.suppress_tokens = sorted({*gen.suppress_tokens, *range(50257, config.vocab_size)})
    if multilingual:
        gen.is_multilingual = True
        gen.lang_to_id = dict(LANGUAGES)
        gen.task_to_id = dict(TASKS)
    model.generation_config = gen
    model.save_pretrained(out)
    return out
