"""Transcripts against transcripts: agreement with the CPU's float32 transcripts of the same
dequantized weights (exact, after Whisper's English normalization) and WER against the
LibriSpeech references, normalized with the pack's own spelling map (normalizer.json), since
the GPU machine has no openai-whisper package."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from loadgen.wer import word_edits  # the one edit distance (jiwer-checked)


@functools.cache
def _normalizer(spelling: Path) -> Any:
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    mapping = json.loads(spelling.read_text()) if spelling.exists() else {}
    return EnglishTextNormalizer(mapping)


def agreement(
    texts: dict[str, str], cpu: dict[str, str], references: dict[str, str], spelling: Path
) -> dict[str, Any]:
    norm = _normalizer(spelling)
    shared = sorted(set(texts) & set(cpu))
    same = sum(norm(texts[k]) == norm(cpu[k]) for k in shared)
    pairs = [
        (norm(references[k]).split(), norm(t).split())
        for k, t in texts.items()
        if references.get(k)
    ]
    words = sum(len(r) for r, _ in pairs)
    return {
        "files": len(texts),
        "agreement_with_cpu_fp32_pct": round(100 * same / len(shared), 1) if shared else None,
        "compared_with_cpu": len(shared),
        "wer": round(sum(word_edits(r, h) for r, h in pairs) / words, 4) if words else None,
        "normalized_with": spelling.name if spelling.exists() else "no spelling map",
    }
