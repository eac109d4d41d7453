"""Stream finals against Recognize with real tiny.en weights: test-other files that a live
stream used to transcribe differently (a trimmed lead-in, pauses of 0.8-1.0 s ending the
utterance mid-sentence, a final decoded with its interim's draft), each sent as a real-time
stream with interims, four at a time. `python -m loadgen finals` measures the same on 40 files."""

from __future__ import annotations

import pytest

from loadgen.dataset import load_dataset
from loadgen.inprocess.finals import compare
from loadgen.wer import normalize
from tests.conftest import LIBRISPEECH, require_data

FILES = ("2414-128291-0006", "3331-159605-0009", "3080-5032-0008", "2033-164914-0007")


def test_each_stream_final_is_the_unary_transcript_of_its_file(real_server) -> None:
    require_data()
    items = [i for i in load_dataset(str(LIBRISPEECH / "test-other")).items if i.id in FILES]
    if len(items) != len(FILES):
        pytest.skip("the test-other files of this test are not all there")
    pairs = compare(real_server.address, items, streams=4, pace=1.0)
    for pair in pairs:
        assert normalize(pair.stream) == normalize(pair.unary), pair
        assert pair.utterances == 1 and not pair.unequal_finals, pair
