"""Word error rate with Whisper's English text normalizer, for tests, the benchmark and the
load generator.

The normalizer is transformers' `EnglishTextNormalizer`, given the spelling map `english.json`
that ships in the `openai-whisper` sdist (installed `--no-deps` by `make install`; only its data
file is read, the package is never imported). Without it, spelling variants (colour/color) are
not unified and the WER reads slightly higher; a warning says so once.

The edit distance is our own (word-level Levenshtein, as jiwer computes it; a test checks they
agree), so that WER needs nothing beyond transformers: the GPU check carries no extra wheels.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

log = logging.getLogger(__name__)


def _spelling_map() -> dict[str, str]:
    spec = importlib.util.find_spec("whisper")  # finds the package without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "normalizers" / "english.json"
        if path.is_file():
            data: dict[str, str] = json.loads(path.read_text())
            return data
    log.warning("openai-whisper's english.json not found: WER without spelling normalization")
    return {}


@functools.cache
def _normalizer() -> Any:
    return EnglishTextNormalizer(_spelling_map())


def normalize(text: str) -> str:
    """Whisper's English normalization: case, punctuation, numbers, spellings."""
    return str(_normalizer()(text))


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER (total edits / total reference words) after normalization."""
    if len(references) != len(hypotheses):
        raise ValueError("references and hypotheses differ in length")
    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses, strict=True)]
    pairs = [(r, h) for r, h in pairs if r]  # an empty reference has no words to miss
    if not pairs:
        return 0.0
    edits = sum(word_edits(r.split(), h.split()) for r, h in pairs)
    return edits / sum(len(r.split()) for r, _ in pairs)


def word_edits(reference: list[str], hypothesis: list[str]) -> int:
    """Substitutions + deletions + insertions turning `reference` into `hypothesis`."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, start=1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, start=1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
            )
        previous = current
    return previous[-1]
