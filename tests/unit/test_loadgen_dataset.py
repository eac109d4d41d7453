"""Data set readers: LibriSpeech's official layout (the shared copy and one built in a tmp dir),
plain audio folders, seeded selection and replay order."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from loadgen.dataset import (
    DatasetError,
    ReplayOrder,
    librispeech_entries,
    load_dataset,
    pcm16,
)
from tests.conftest import JFK_WAV, LIBRISPEECH, librispeech_items, require_data


def test_official_layout_one_split():
    require_data()
    ds = load_dataset(str(LIBRISPEECH / "test-clean"))
    expected = librispeech_items("test-clean")
    assert ds.kind == "librispeech"
    assert [i.id for i in ds.items] == [uid for uid, _, _ in expected]
    assert ds.references == {uid: text for uid, _, text in expected}
    first = ds.items[0]
    path = expected[0][1]
    assert first.data == path.read_bytes()  # the original bytes, not re-encoded
    assert first.encoding == "FLAC"
    assert first.audio_s == pytest.approx(sf.info(path).duration)
    assert ds.describe()["files"] == 7


def test_official_layout_root_with_all_splits():
    require_data()
    entries = librispeech_entries(LIBRISPEECH)
    splits = {p.name for p in LIBRISPEECH.iterdir() if p.is_dir()}
    assert len(entries) == sum(len(librispeech_items(s)) for s in splits)
    assert {"1089-134686-0000", "2412-153948-0000", "367-130732-0000"} <= {e.id for e in entries}


def test_official_layout_built_in_tmp(tmp_path: Path):
    require_data()
    src = librispeech_items("test-other")[:2]
    chapter = tmp_path / "LibriSpeech" / "test-other" / "1688" / "142285"
    chapter.mkdir(parents=True)
    lines = []
    for uid, path, text in src:
        shutil.copy(path, chapter / path.name)
        lines.append(f"{uid} {text}")
    lines.append("1688-142285-9999 A LINE WHOSE AUDIO IS MISSING")
    (chapter / "1688-142285.trans.txt").write_text("\n".join(lines) + "\n")
    ds = load_dataset(str(tmp_path / "LibriSpeech"))
    assert [i.id for i in ds.items] == [uid for uid, _, _ in src]
    assert [i.reference for i in ds.items] == [text for _, _, text in src]


def test_limit_is_a_seeded_sample(caplog):
    require_data()
    spec = str(LIBRISPEECH / "test-other")
    a = [i.id for i in load_dataset(spec, limit=5, seed=1).items]
    b = [i.id for i in load_dataset(spec, limit=5, seed=1).items]
    c = [i.id for i in load_dataset(spec, limit=5, seed=2).items]
    assert a == b and len(a) == 5 and a == sorted(a)
    assert a != c
    assert not caplog.records
    assert len(load_dataset(str(LIBRISPEECH / "test-clean"), limit=16).items) == 7
    # --limit 16 on a 7-file split is said out loud, not silently taken as 7.
    assert "--limit 16 but" in caplog.text and "holds only 7 files: using all 7" in caplog.text


def test_plain_folder_with_optional_transcripts(tmp_path: Path):
    require_data()
    shutil.copy(JFK_WAV, tmp_path / "jfk.wav")
    (tmp_path / "jfk.txt").write_text("And so my fellow Americans.\n")
    sub = tmp_path / "more"
    sub.mkdir()
    flac = librispeech_items("test-clean")[0][1]
    shutil.copy(flac, sub / "clip.flac")
    (tmp_path / "notes.md").write_text("not audio")
    ds = load_dataset(str(tmp_path))
    assert ds.kind == "folder"
    assert {i.id: i.encoding for i in ds.items} == {"jfk": "WAV", "more/clip": "FLAC"}
    assert ds.references == {"jfk": "And so my fellow Americans."}


def test_errors_name_what_was_looked_for(tmp_path: Path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match=r"no \*\.trans\.txt and no audio"):
        load_dataset(str(tmp_path))
    (tmp_path / "bad.wav").write_bytes(b"RIFF but not really")
    with pytest.raises(DatasetError, match="cannot read audio"):
        load_dataset(str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets installed")
def test_hugging_face_without_datasets_says_how_to_get_it():
    with pytest.raises(DatasetError, match="pip install datasets"):
        load_dataset("hf:librispeech_asr:clean:test", limit=2)


def test_replay_order_is_seeded_and_covers_every_item_per_pass():
    order = ReplayOrder(5, seed="0:local")
    first_pass = [order.next() for _ in range(5)]
    second_pass = [order.next() for _ in range(5)]
    assert sorted(first_pass) == sorted(second_pass) == [0, 1, 2, 3, 4]
    again = ReplayOrder(5, seed="0:local")
    assert [again.next() for _ in range(10)] == first_pass + second_pass
    other = ReplayOrder(5, seed="0:w1")
    assert [other.next() for _ in range(10)] != first_pass + second_pass


def test_pcm16_for_streams_is_mono_16bit():
    require_data()
    ds = load_dataset(str(LIBRISPEECH / "test-clean"), limit=1)
    pcm, rate = pcm16(ds.items[0])
    assert rate == 16000
    assert len(pcm) == 2 * round(ds.items[0].audio_s * rate)


# -- the shipped sample and decoded clips ----------------------------------------------------
def test_sample_is_the_default_and_works_offline():
    from loadgen.cli import build_parser
    from loadgen.dataset import DEFAULT_DATASET, SAMPLES

    args = build_parser().parse_args(["run", "--target", "x:1", "--out", "o"])
    assert args.dataset == DEFAULT_DATASET == "sample"
    every = load_dataset("sample")
    assert every.kind == "librispeech" and len(every.items) == 27
    assert len(every.references) == 27  # WER works out of the box
    clean = load_dataset("sample:test-clean")
    assert len(clean.items) == 7 and {i.id for i in clean.items} < {i.id for i in every.items}
    licence = (SAMPLES / "README.md").read_text()
    assert "CC BY 4.0" in licence and "public domain" in licence
    assert (SAMPLES / "jfk.wav").is_file() and (SAMPLES / "jfk.flac").is_file()


def test_unknown_sample_split_names_the_folder():
    with pytest.raises(DatasetError, match="samples/LibriSpeech/dev-other"):
        load_dataset("sample:dev-other")


def test_clips_are_decoded_filtered_by_length_and_keep_references():
    from loadgen.dataset import load_clips

    clips = load_clips("sample", files=5, min_s=2.5, max_s=5.0)
    assert len(clips) == 5 and all(2.5 <= c.duration_s <= 5.0 for c in clips)
    assert [c.id for c in clips] == sorted(c.id for c in clips)
    assert all(c.reference and c.samples.dtype.name == "float32" for c in clips)
    assert len(clips[0].pcm16()) == 2 * len(clips[0].samples)
    with pytest.raises(DatasetError, match="no 16 kHz mono clips of 100-200 s"):
        load_clips("sample", min_s=100, max_s=200)


def test_a_transcripts_file_gives_references_to_a_plain_folder(tmp_path: Path):
    shutil.copy(JFK_WAV, tmp_path / "jfk.wav")
    (tmp_path / "transcripts.txt").write_text("jfk AND SO MY FELLOW AMERICANS\n")
    (item,) = load_dataset(str(tmp_path)).items
    assert (item.id, item.reference) == ("jfk", "AND SO MY FELLOW AMERICANS")
