"""Word error rate: our word-level edit distance agrees with jiwer's on real transcripts and on
edge cases (jiwer is a test dependency only)."""

from __future__ import annotations

import jiwer
import pytest

from loadgen.wer import normalize, word_error_rate
from tests.conftest import librispeech_items, require_data


@pytest.mark.parametrize(
    ("reference", "hypothesis"),
    [
        ("the cat sat on the mat", "the cat sat on the mat"),
        ("the cat sat on the mat", "a cat sat on mat today"),
        ("one two three", ""),
        ("one", "one two three four"),
        ("a b c d e f", "f e d c b a"),
    ],
)
def test_matches_jiwer_on_edge_cases(reference: str, hypothesis: str) -> None:
    want = jiwer.wer(normalize(reference), normalize(hypothesis) or "")
    assert word_error_rate([reference], [hypothesis]) == pytest.approx(want)


def test_matches_jiwer_on_a_corpus() -> None:
    require_data()
    refs = [text for _, _, text in librispeech_items("test-other")[:30]]
    # Hypotheses made from other references: many edits of every kind.
    hyps = [" ".join(r.split()[1:]) + " extra" for r in refs[1:]] + [refs[0]]
    pairs = [(normalize(r), normalize(h)) for r, h in zip(refs, hyps, strict=True)]
    want = jiwer.wer([r for r, _ in pairs], [h for _, h in pairs])
    assert word_error_rate(refs, hyps) == pytest.approx(want)
    assert word_error_rate(refs, refs) == 0.0
