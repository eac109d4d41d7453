"""CTranslate2 model.bin parsing, the Whisper name mapping and offline provisioning.

Everything here runs on tiny synthetic models written by a small CTranslate2 writer
below, so no real weights are needed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.checkpoints import ct2_convert, provision
from server.checkpoints.ct2_convert import (
    CONVERSION_MARKER,
    ConversionError,
    build_state_dict,
    convert_ct2_to_transformers,
    infer_dims,
)
from server.checkpoints.ct2_reader import (
    CT2FormatError,
    bfloat16_to_float32,
    parse_ct2,
    read_ct2_model,
)
from server.checkpoints.provision import ModelProvisionError, concatenate_files, resolve_model

# --------------------------------------------------------------------------- writer

DTYPE_IDS = {"f32": 0, "i8": 1, "i16": 2, "i32": 3, "f16": 4, "bf16": 5}
NUMPY_FOR = {
    "f32": np.float32,
    "i8": np.int8,
    "i16": np.int16,
    "i32": np.int32,
    "f16": np.float16,
    "bf16": np.uint16,
}


def _str(value: str) -> bytes:
    raw = value.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_bytes(
    variables: Mapping[str, tuple[np.ndarray, str]],
    aliases: Mapping[str, str] | None = None,
    *,
    version: int = 6,
    spec: str = "WhisperSpec",
    revision: int = 3,
) -> bytes:
    """Serialize variables as CTranslate2 does (sorted by name, like the real writer)."""
    out = [struct.pack("<I", version), _str(spec), struct.pack("<I", revision)]
    out.append(struct.pack("<I", len(variables)))
    for name in sorted(variables):
        array, kind = variables[name]
        data = np.ascontiguousarray(array, dtype=NUMPY_FOR[kind])
        out += [_str(name), struct.pack("<B", data.ndim)]
        out += [struct.pack("<I", d) for d in data.shape]
        out += [struct.pack("<B", DTYPE_IDS[kind]), struct.pack("<I", data.nbytes)]
        out.append(data.astype(data.dtype.newbyteorder("<")).tobytes())
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [_str(alias), _str(target)]
    return b"".join(out)


def write_ct2(path: Path, variables: Mapping[str, tuple[np.ndarray, str]], **kwargs: Any) -> Path:
    path.write_bytes(ct2_bytes(variables, **kwargs))
    return path


# --------------------------------------------------------------------------- reader


def test_every_dtype_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values: dict[str, np.ndarray] = {
        "f32": rng.standard_normal((2, 3)).astype(np.float32),
        "i16": np.array([-300, 0, 300], dtype=np.int16),
        "i32": np.arange(6, dtype=np.int32).reshape(1, 2, 3),
        "f16": rng.standard_normal((4,)).astype(np.float16),
        "i8": np.array([-128, 0, 127], dtype=np.int8),
    }
    model = read_ct2_model(
        write_ct2(tmp_path / "model.bin", {k: (v, k) for k, v in values.items()})
    )
    assert (model.binary_version, model.spec_name, model.spec_revision) == (6, "WhisperSpec", 3)
    for name, expected in values.items():
        got = model.raw(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_bfloat16_is_widened_to_float32() -> None:
    floats = np.array([1.0, -2.5, 0.15625, 2.0**100], dtype=np.float32)
    bits = (floats.view(np.uint32) >> 16).astype(np.uint16)  # exact: all fit in bf16
    model = parse_ct2(ct2_bytes({"w": (bits, "bf16")}))
    assert model.get("w").dtype == np.float32
    np.testing.assert_array_equal(model.get("w"), floats)
    np.testing.assert_array_equal(bfloat16_to_float32(bits), floats)


def test_scalars_and_aliases() -> None:
    variables = {
        "decoder/num_heads": (np.array(6), "i16"),
        "decoder/scale_embeddings": (np.array(0), "i8"),
        "decoder/embeddings/weight": (np.ones((3, 2)), "f16"),
    }
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    model = parse_ct2(ct2_bytes(variables, aliases))
    assert model.scalar("decoder/num_heads") == 6
    assert model.scalar("decoder/scale_embeddings") == 0
    assert model.aliases == aliases
    assert "decoder/projection/weight" in model
    assert model.get("decoder/projection/weight") is model.get("decoder/embeddings/weight")
    assert "decoder/missing" not in model
    with pytest.raises(KeyError, match="missing"):
        model.raw("decoder/missing")


def test_int8_weights_are_dequantized_with_row_scales() -> None:
    weight = np.array([[0.5, -1.0, 0.25], [2.0, 0.0, -4.0]], dtype=np.float32)
    scale = (127.0 / np.abs(weight).max(axis=1)).astype(np.float32)
    quantized = np.round(weight * scale[:, None]).astype(np.int8)
    model = parse_ct2(ct2_bytes({"w": (quantized, "i8"), "w_scale": (scale, "f32")}))
    assert model.raw("w").dtype == np.int8
    np.testing.assert_allclose(model.get("w"), quantized / scale[:, None], rtol=1e-6)
    np.testing.assert_allclose(model.get("w"), weight, atol=0.02)


def test_int8_weight_without_scale_is_an_error() -> None:
    model = parse_ct2(ct2_bytes({"w": (np.ones((2, 2)), "i8")}))
    with pytest.raises(CT2FormatError, match="w_scale"):
        model.get("w")


def test_truncated_file_raises_a_clear_error(tmp_path: Path) -> None:
    data = ct2_bytes({"a": (np.ones((4, 4)), "f32")}, {"b": "a"})
    for cut in (2, 10, 20, len(data) // 2, len(data) - 1):
        with pytest.raises(CT2FormatError, match="truncated"):
            parse_ct2(data[:cut])
    (tmp_path / "model.bin").write_bytes(data[:30])
    with pytest.raises(ValueError, match="truncated"):  # CT2FormatError is a ValueError
        read_ct2_model(tmp_path)


@pytest.mark.parametrize("version", [0, 5, 7, 0x4E5A4F5A])
def test_unsupported_version_is_rejected(version: int) -> None:
    with pytest.raises(CT2FormatError, match="version"):
        parse_ct2(ct2_bytes({"a": (np.ones(2), "f32")}, version=version))


def test_empty_file_and_inconsistent_sizes(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(CT2FormatError, match="empty"):
        read_ct2_model(tmp_path / "model.bin")
    data = bytearray(ct2_bytes({"a": (np.ones(2), "f32")}))
    size_at = data.index(b"\x00\x08\x00\x00\x00") + 1  # dtype 0, nbytes 8
    data[size_at : size_at + 4] = struct.pack("<I", 12)
    with pytest.raises(CT2FormatError, match="bytes stored"):
        parse_ct2(bytes(data))


# --------------------------------------------------------------------------- mapping

D, HEADS, FFN, MELS, SRC, TGT = 8, 2, 16, 4, 6, 5


def whisper_variables(vocab: int, layers: int = 1, seed: int = 0) -> dict[str, tuple[Any, str]]:
    """A random CTranslate2 WhisperSpec with the real variable names, float16 like the real ones."""
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> tuple[np.ndarray, str]:
        return rng.standard_normal(shape).astype(np.float16), "f16"

    v: dict[str, tuple[Any, str]] = {
        "encoder/conv1/weight": rand(D, MELS, 3),
        "encoder/conv1/bias": rand(D),
        "encoder/conv2/weight": rand(D, D, 3),
        "encoder/conv2/bias": rand(D),
        "encoder/position_encodings/encodings": rand(SRC, D),
        "decoder/position_encodings/encodings": rand(TGT, D),
        "decoder/embeddings/weight": rand(vocab, D),
        "encoder/num_heads": (np.array(HEADS), "i16"),
        "decoder/num_heads": (np.array(HEADS), "i16"),
        "decoder/scale_embeddings": (np.array(0), "i8"),
        "decoder/alignment_heads": (np.array(1), "i16"),
    }
    for side in ("encoder", "decoder"):
        v[f"{side}/layer_norm/gamma"], v[f"{side}/layer_norm/beta"] = rand(D), rand(D)
        for i in range(layers):
            p = f"{side}/layer_{i}"
            bias = rng.standard_normal(3 * D).astype(np.float16)
            bias[D : 2 * D] = 0  # CTranslate2 stores a zero key bias
            v[f"{p}/self_attention/linear_0/weight"] = rand(3 * D, D)
            v[f"{p}/self_attention/linear_0/bias"] = (bias, "f16")
            v[f"{p}/self_attention/linear_1/weight"] = rand(D, D)
            v[f"{p}/self_attention/linear_1/bias"] = rand(D)
            names = ["self_attention/layer_norm", "ffn/layer_norm"]
            if side == "decoder":
                kv_bias = rng.standard_normal(2 * D).astype(np.float16)
                kv_bias[:D] = 0
                v[f"{p}/attention/linear_0/weight"] = rand(D, D)
                v[f"{p}/attention/linear_0/bias"] = rand(D)
                v[f"{p}/attention/linear_1/weight"] = rand(2 * D, D)
                v[f"{p}/attention/linear_1/bias"] = (kv_bias, "f16")
                v[f"{p}/attention/linear_2/weight"] = rand(D, D)
                v[f"{p}/attention/linear_2/bias"] = rand(D)
                names.append("attention/layer_norm")
            for ln in names:
                v[f"{p}/{ln}/gamma"], v[f"{p}/{ln}/beta"] = rand(D), rand(D)
            v[f"{p}/ffn/linear_0/weight"], v[f"{p}/ffn/linear_0/bias"] = rand(FFN, D), rand(FFN)
            v[f"{p}/ffn/linear_1/weight"], v[f"{p}/ffn/linear_1/bias"] = rand(D, FFN), rand(D)
    return v


TIED = {"decoder/projection/weight": "decoder/embeddings/weight"}


def test_dims_are_inferred_from_the_weights() -> None:
    model = parse_ct2(ct2_bytes(whisper_variables(vocab=30, layers=2), TIED))
    dims = infer_dims(model)
    assert (dims.d_model, dims.encoder_layers, dims.decoder_layers) == (D, 2, 2)
    assert (dims.encoder_heads, dims.encoder_ffn_dim, dims.vocab_size) == (HEADS, FFN, 30)
    assert (dims.num_mel_bins, dims.max_source_positions, dims.max_target_positions) == (
        MELS,
        SRC,
        TGT,
    )
    assert not dims.is_multilingual


def test_state_dict_matches_transformers_exactly() -> None:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    model = parse_ct2(ct2_bytes(whisper_variables(vocab=30), TIED))
    state = build_state_dict(model)
    config = WhisperConfig(
        vocab_size=30,
        num_mel_bins=MELS,
        d_model=D,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN,
        max_source_positions=SRC,
        max_target_positions=TGT,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=1,
    )
    reference = WhisperForConditionalGeneration(config).state_dict()
    expected = {k: tuple(t.shape) for k, t in reference.items() if k != "proj_out.weight"}
    assert {k: tuple(a.shape) for k, a in state.items()} == expected
    ct2_convert.check_state_dict(state, config)  # the converter's own guard agrees


def test_fused_projections_are_split_and_key_bias_dropped() -> None:
    variables = whisper_variables(vocab=30)
    model = parse_ct2(ct2_bytes(variables, TIED))
    state = build_state_dict(model)
    w = variables["decoder/layer_0/self_attention/linear_0/weight"][0].astype(np.float32)
    b = variables["decoder/layer_0/self_attention/linear_0/bias"][0].astype(np.float32)
    attn = "model.decoder.layers.0.self_attn"
    for i, proj in enumerate("qkv"):
        np.testing.assert_array_equal(state[f"{attn}.{proj}_proj.weight"], w[i * D : (i + 1) * D])
    np.testing.assert_array_equal(state[f"{attn}.q_proj.bias"], b[:D])
    np.testing.assert_array_equal(state[f"{attn}.v_proj.bias"], b[2 * D :])
    assert f"{attn}.k_proj.bias" not in state
    cross = "model.decoder.layers.0.encoder_attn"
    kv = variables["decoder/layer_0/attention/linear_1/weight"][0].astype(np.float32)
    np.testing.assert_array_equal(state[f"{cross}.k_proj.weight"], kv[:D])
    np.testing.assert_array_equal(state[f"{cross}.v_proj.weight"], kv[D:])
    assert f"{cross}.k_proj.bias" not in state


def test_layer_norms_are_renamed_gamma_beta_to_weight_bias() -> None:
    variables = whisper_variables(vocab=30)
    state = build_state_dict(parse_ct2(ct2_bytes(variables, TIED)))
    pairs = {
        "encoder/layer_0/self_attention/layer_norm": "model.encoder.layers.0.self_attn_layer_norm",
        "decoder/layer_0/attention/layer_norm": "model.decoder.layers.0.encoder_attn_layer_norm",
        "decoder/layer_0/ffn/layer_norm": "model.decoder.layers.0.final_layer_norm",
        "encoder/layer_norm": "model.encoder.layer_norm",
    }
    for src, dst in pairs.items():
        np.testing.assert_array_equal(state[f"{dst}.weight"], variables[f"{src}/gamma"][0])
        np.testing.assert_array_equal(state[f"{dst}.bias"], variables[f"{src}/beta"][0])
    assert not any("gamma" in k or "beta" in k for k in state)


def test_non_whisper_spec_is_rejected() -> None:
    model = parse_ct2(ct2_bytes(whisper_variables(vocab=30), TIED, spec="TransformerSpec"))
    with pytest.raises(ConversionError, match="WhisperSpec"):
        build_state_dict(model)


# --------------------------------------------------------------------------- full conversion

SPECIALS = [
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]


def _byte_vocab() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_ct2_dir(path: Path, with_vocabulary: bool = True) -> Path:
    """A complete English-only CTranslate2 Whisper directory with a tiny byte-level BPE."""
    path.mkdir(parents=True, exist_ok=True)
    tokens = [*_byte_vocab(), "Ġt", "he"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    eot = vocab["<|endoftext|>"] = len(vocab)
    added = [{"id": eot, "content": "<|endoftext|>", "special": True}]
    added += [
        {"id": eot + 1 + i, "content": tok, "special": True} for i, tok in enumerate(SPECIALS)
    ]
    for token in added:
        token.update(single_word=False, lstrip=False, rstrip=False, normalized=False)
    merges: list[Any] = [["Ġ", "t"], "h e"]  # both serializations occur in the wild
    tokenizer = {"added_tokens": added, "model": {"type": "BPE", "vocab": vocab, "merges": merges}}
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    all_tokens = [*tokens, "<|endoftext|>", *SPECIALS, *timestamps]
    if with_vocabulary:
        (path / "vocabulary.txt").write_text("\n".join(all_tokens) + "\n", encoding="utf-8")
    config = {"suppress_ids": [1, 2], "suppress_ids_begin": [220, eot], "alignment_heads": [[0, 1]]}
    (path / "config.json").write_text(json.dumps(config))
    write_ct2(path / "model.bin", whisper_variables(vocab=len(all_tokens)), aliases=TIED)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    return convert_ct2_to_transformers(write_ct2_dir(root / "ct2"), root / "hf")


def test_synthetic_conversion_loads_offline(converted: Path) -> None:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    loaded: Any = WhisperForConditionalGeneration.from_pretrained(
        converted, output_loading_info=True, local_files_only=True
    )
    model, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    processor = WhisperProcessor.from_pretrained(converted, local_files_only=True)
    tokenizer = processor.tokenizer
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.convert_tokens_to_ids("<|0.00|>") == eot + len(SPECIALS) + 1
    assert tokenizer.convert_tokens_to_ids("<|30.00|>") == model.config.vocab_size - 1
    assert tokenizer.decode(tokenizer("the tea").input_ids, skip_special_tokens=True) == "the tea"
    generation = model.generation_config
    assert generation.decoder_start_token_id == eot + 1
    assert generation.no_timestamps_token_id == eot + len(SPECIALS)
    assert generation.alignment_heads == [[0, 1]]
    assert not hasattr(generation, "lang_to_id")  # English-only: no language detection
    assert model.config.suppress_tokens == [1, 2]
    assert model.config.begin_suppress_tokens == [220, eot]
    assert processor.feature_extractor.feature_size == MELS
    assert (converted / CONVERSION_MARKER).is_file()
    assert not any(p.name.startswith(".") for p in converted.parent.iterdir())


def test_timestamps_without_vocabulary_txt(tmp_path: Path) -> None:
    ct2_dir = write_ct2_dir(tmp_path / "ct2", with_vocabulary=False)
    data = ct2_convert.load_tokenizer_data(ct2_dir, vocab_size=258 + 1 + len(SPECIALS) + 1501)
    assert data.timestamp_tokens[0] == (259 + len(SPECIALS), "<|0.00|>")
    assert data.timestamp_tokens[-1][1] == "<|30.00|>"


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path) -> None:
    ct2_dir = write_ct2_dir(tmp_path / "ct2")
    (ct2_dir / "tokenizer.json").write_text("{not json")
    out = tmp_path / "out" / "model"
    with pytest.raises(ConversionError, match=r"tokenizer\.json"):
        convert_ct2_to_transformers(ct2_dir, out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_half_precision_output(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open

    out = convert_ct2_to_transformers(
        write_ct2_dir(tmp_path / "ct2"), tmp_path / "hf", torch.float16
    )
    with safe_open(str(out / ct2_convert.WEIGHTS_FILE), framework="pt") as weights:
        tensor = weights.get_tensor("model.encoder.conv1.weight")
    assert tensor.dtype == torch.float16
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_unsupported_dtype_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        convert_ct2_to_transformers(tmp_path, tmp_path / "out", dtype="int4")


# --------------------------------------------------------------------------- provisioning


def test_local_ct2_dir_is_converted_once_into_the_cache(tmp_path: Path) -> None:
    ct2_dir = write_ct2_dir(tmp_path / "my model")
    cache = tmp_path / "cache"
    first = resolve_model(str(ct2_dir), cache)
    assert first.is_local and first.local_path is not None
    assert first.local_path.parent == cache and first.source == "ct2-dir"
    marker_mtime = (first.local_path / CONVERSION_MARKER).stat().st_mtime_ns
    second = resolve_model(str(ct2_dir), cache)
    assert second == first
    assert (first.local_path / CONVERSION_MARKER).stat().st_mtime_ns == marker_mtime


def test_cache_lock_is_exclusive(tmp_path: Path) -> None:
    """A second holder blocks until the first leaves (no sleeps: the contender's own "waiting"
    log line says it is blocked)."""
    events: list[str] = []
    blocked = threading.Event()

    class Waiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for another process" in record.getMessage():
                blocked.set()

    handler = Waiting()
    provision.logger.addHandler(handler)
    previous = provision.logger.level
    provision.logger.setLevel(logging.INFO)

    def contender() -> None:
        with provision.cache_lock(tmp_path, "entry"):
            events.append("contender")

    try:
        with provision.cache_lock(tmp_path, "entry"):
            other = (tmp_path / ".entry.lock").open("a")  # flock conflicts across open files
            with other, pytest.raises(BlockingIOError):
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            thread = threading.Thread(target=contender)
            thread.start()
            assert blocked.wait(10)  # it is waiting for this holder
            events.append("holder")
        thread.join(timeout=10)
    finally:
        provision.logger.removeHandler(handler)
        provision.logger.setLevel(previous)
    assert events == ["holder", "contender"]


@pytest.mark.slow  # a subprocess
def test_concurrent_cli_runs_convert_once(tmp_path: Path) -> None:
    ct2_dir, cache = write_ct2_dir(tmp_path / "ct2"), tmp_path / "cache"
    command = [sys.executable, "-m", "server.checkpoints.provision", str(ct2_dir), "--cache-dir"]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    runs = [
        subprocess.Popen(
            [*command, str(cache)],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    results = [(run.communicate(timeout=300), run.returncode) for run in runs]
    assert [code for _, code in results] == [0, 0], [err.decode() for (_, err), _ in results]
    paths = {out.decode().strip() for (out, _), _ in results}
    logs = b"".join(err for (_, err), _ in results).decode()
    assert len(paths) == 1 and Path(paths.pop()).parent == cache
    assert logs.count("converted ") == 1, logs  # the flock made the loser wait and reuse
    entries = [p.name for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1 and entries[0].startswith("local-ct2-"), entries  # no temp dirs


def test_transformers_dir_and_hub_ids_are_used_as_is(tmp_path: Path, converted: Path) -> None:
    resolved = resolve_model(str(converted), tmp_path / "cache")
    assert resolved.name_or_path == str(converted.resolve()) and resolved.is_local
    assert not (tmp_path / "cache").exists()
    hub = resolve_model("openai/whisper-tiny", tmp_path / "cache")
    assert (hub.name_or_path, hub.local_path, hub.source) == ("openai/whisper-tiny", None, "hub")


def test_bad_local_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelProvisionError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"), tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelProvisionError, match="neither"):
        resolve_model(str(tmp_path / "empty"), tmp_path / "cache")


def test_missing_builtin_packages_say_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builtin = provision.BUILTIN_MODELS["base"]
    fake = provision.BuiltinModel("base", "test", ("no-such-dist-xyz",), builtin.stage)
    monkeypatch.setitem(provision.BUILTIN_MODELS, "base", fake)
    with pytest.raises(ModelProvisionError, match="pip install no-such-dist-xyz"):
        resolve_model("base", tmp_path)


def test_concatenate_streams_parts(tmp_path: Path) -> None:
    parts = [tmp_path / "a", tmp_path / "b"]
    parts[0].write_bytes(b"x" * 1000)
    parts[1].write_bytes(b"yz")
    assert concatenate_files(parts, tmp_path / "joined") == 1002
    assert (tmp_path / "joined").read_bytes() == b"x" * 1000 + b"yz"


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert provision.default_cache_dir() == tmp_path / "whisper-grpc"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert provision.default_cache_dir() == tmp_path / "home" / ".cache" / "whisper-grpc"
