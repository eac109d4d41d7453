"""Reader for CTranslate2 ``model.bin`` files.

CTranslate2 stores a model as a flat list of named tensors. The binary layout
(little-endian) is::

    u32 binary_version
    str spec_name
    u32 spec_revision
    u32 n_vars
    n_vars x (str name, u8 rank, u32 dims[rank], u8 dtype, u32 nbytes, bytes data)
    u32 n_aliases
    n_aliases x (str alias, str target)

where ``str`` is a ``u16`` length (counting the trailing NUL), the bytes and the NUL.

The reader is deliberately independent of any particular model architecture and of
CTranslate2 itself (which is not installed): it only returns numpy arrays. Arrays are
views on a memory map where possible, so reading a 75 MB file costs no extra copy
until a tensor is actually converted.
"""

from __future__ import annotations

import logging
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: Binary format versions this reader understands. Older versions encode dtypes
#: differently, so accepting them silently would misparse the file.
SUPPORTED_BINARY_VERSIONS = frozenset({6})

#: CTranslate2 dtype ids -> numpy dtypes (little-endian).
CT2_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    # bfloat16 has no numpy dtype: keep the raw 16-bit pattern, widened on demand.
    5: np.dtype("<u2"),
}
DTYPE_BFLOAT16 = 5
SCALE_SUFFIX = "_scale"


class CT2FormatError(ValueError):
    """Raised when a file is not a valid (or supported) CTranslate2 model."""


@dataclass
class CT2Model:
    """The content of a CTranslate2 ``model.bin``.

    ``variables`` holds the tensors exactly as stored (int8 weights stay int8,
    bfloat16 stays as raw ``uint16``); use :meth:`get` for dequantized float values.
    """

    binary_version: int
    spec_name: str
    spec_revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)
    bfloat16_names: frozenset[str] = frozenset()

    def resolve(self, name: str) -> str:
        """Follow aliases (e.g. a tied projection) to the stored variable name."""
        seen: set[str] = set()
        while name in self.aliases:
            if name in seen:
                raise CT2FormatError(f"alias cycle involving {name!r}")
            seen.add(name)
            name = self.aliases[name]
        return name

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.resolve(name) in self.variables

    def raw(self, name: str) -> np.ndarray:
        """Return the stored array for ``name`` (after alias resolution)."""
        target = self.resolve(name)
        try:
            return self.variables[target]
        except KeyError:
            raise KeyError(f"variable {name!r} not found in {self.spec_name} model") from None

    def get(self, name: str) -> np.ndarray:
        """Return ``name`` as a float array, dequantizing int8/int16 weights.

        CTranslate2 quantizes per output row: ``q = round(w * scale)``, so the
        original weight is ``q / scale[:, None]``.
        """
        target = self.resolve(name)
        array = self.raw(target)
        if target in self.bfloat16_names:
            return bfloat16_to_float32(array)
        if array.dtype.kind != "i" or array.ndim < 2:
            return array
        scale_name = target + SCALE_SUFFIX
        if scale_name not in self.variables:
            raise CT2FormatError(f"quantized variable {target!r} has no {scale_name!r}")
        scale = self.get(scale_name).astype(np.float32)
        shape = (-1,) + (1,) * (array.ndim - 1)
        return array.astype(np.float32) / scale.reshape(shape)

    def scalar(self, name: str) -> int | float:
        """Return a rank-0 variable (e.g. ``decoder/num_heads``) as a Python number."""
        value = self.get(name)
        if value.size != 1:
            raise CT2FormatError(f"variable {name!r} is not a scalar (shape {value.shape})")
        return value.reshape(()).item()  # type: ignore[no-any-return]


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bit patterns (uint16) to float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class _Cursor:
    """Sequential little-endian reader over a buffer with truncation checks."""

    def __init__(self, buffer: memoryview | bytes, source: str) -> None:
        self._buf = buffer
        self._pos = 0
        self._source = source

    @property
    def position(self) -> int:
        return self._pos

    def take(self, size: int, what: str) -> memoryview | bytes:
        end = self._pos + size
        if size < 0 or end > len(self._buf):
            raise CT2FormatError(
                f"{self._source}: truncated file while reading {what} "
                f"(need {size} bytes at offset {self._pos}, file has {len(self._buf)})"
            )
        chunk = self._buf[self._pos : end]
        self._pos = end
        return chunk

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize("<" + fmt)
        (value,) = struct.unpack("<" + fmt, self.take(size, what))
        return int(value)

    def string(self, what: str) -> str:
        length = self.unpack("H", f"{what} length")
        if length == 0:
            raise CT2FormatError(f"{self._source}: zero-length string for {what}")
        raw = bytes(self.take(length, what))
        if raw[-1] != 0:
            raise CT2FormatError(f"{self._source}: {what} is not NUL-terminated")
        return raw[:-1].decode("utf-8")


def _read_variable(cur: _Cursor) -> tuple[str, np.ndarray, bool]:
    """Read one variable record; return (name, array, is_bfloat16)."""
    name = cur.string("variable name")
    rank = cur.unpack("B", f"rank of {name}")
    dims = tuple(cur.unpack("I", f"dims of {name}") for _ in range(rank))
    dtype_id = cur.unpack("B", f"dtype of {name}")
    if dtype_id not in CT2_DTYPES:
        raise CT2FormatError(f"variable {name!r} has unknown dtype id {dtype_id}")
    dtype = CT2_DTYPES[dtype_id]
    nbytes = cur.unpack("I", f"size of {name}")
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if nbytes != expected:
        raise CT2FormatError(
            f"variable {name!r}: {nbytes} bytes stored but shape {dims} x {dtype} needs {expected}"
        )
    data = cur.take(nbytes, f"data of {name}")
    array = np.frombuffer(data, dtype=dtype).reshape(dims)
    return name, array, dtype_id == DTYPE_BFLOAT16


def parse_ct2(buffer: memoryview | bytes, source: str = "<buffer>") -> CT2Model:
    """Parse a CTranslate2 model from an in-memory buffer (bytes or memoryview)."""
    cur = _Cursor(buffer, source)
    version = cur.unpack("I", "binary version")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise CT2FormatError(
            f"{source}: unsupported CTranslate2 binary version {version} "
            f"(supported: {sorted(SUPPORTED_BINARY_VERSIONS)}); is this a CTranslate2 model.bin?"
        )
    spec_name = cur.string("spec name")
    spec_revision = cur.unpack("I", "spec revision")
    n_vars = cur.unpack("I", "variable count")
    variables: dict[str, np.ndarray] = {}
    bf16: set[str] = set()
    for _ in range(n_vars):
        name, array, is_bf16 = _read_variable(cur)
        variables[name] = array
        if is_bf16:
            bf16.add(name)
    aliases: dict[str, str] = {}
    n_aliases = cur.unpack("I", "alias count")
    for _ in range(n_aliases):
        alias = cur.string("alias name")
        aliases[alias] = cur.string(f"target of alias {alias}")
    if cur.position != len(buffer):
        logger.warning("%s: %d trailing bytes ignored", source, len(buffer) - cur.position)
    return CT2Model(version, spec_name, spec_revision, variables, aliases, frozenset(bf16))


def read_ct2_model(path: Path) -> CT2Model:
    """Read a CTranslate2 ``model.bin`` (or a directory containing one).

    The file is memory-mapped read-only; the returned arrays reference the map,
    which stays alive as long as any array does.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    with path.open("rb") as handle:
        if path.stat().st_size == 0:
            raise CT2FormatError(f"{path}: empty file")
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    model = parse_ct2(memoryview(mapped), source=str(path))
    logger.debug(
        "read %s: %s rev %d, %d variables, %d aliases",
        path,
        model.spec_name,
        model.spec_revision,
        len(model.variables),
        len(model.aliases),
    )
    return model
