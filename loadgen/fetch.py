"""Download LibriSpeech splits from OpenSLR into a cache: resumable, verified, safely unpacked.

`ensure_librispeech("test-clean")` returns `<cache>/LibriSpeech/test-clean`, downloading
`<base_url>/test-clean.tar.gz` first when the split is not there yet:

* the download goes to `<name>.part` and resumes with an HTTP Range request after a broken
  connection (or on the next run), with a progress bar on stderr;
* the archive is checked against the published checksum (sha256 where we know it, else md5;
  `sha256=`/`md5=` override the table, e.g. for a mirror or a split not listed), and deleted on
  a mismatch so the next run downloads it again;
* unpacking refuses absolute paths, `..`, links and device files, extracts into a staging
  folder and moves the split into place, so an interrupted unpack never looks complete.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from loadgen.config import DEFAULT_CACHE_DIR
from loadgen.errors import LoadgenError

log = logging.getLogger(__name__)

OPENSLR_BASE_URL = "https://www.openslr.org/resources/12"
COMPLETE_MARKER = ".loadgen-complete"


@dataclass(frozen=True)
class Archive:
    """Published checksums of one split's tarball (OpenSLR's md5sum.txt; sha256 as computed
    by torchaudio) and its size in bytes when known."""

    md5: str
    sha256: str | None = None
    size: int | None = None


LIBRISPEECH: dict[str, Archive] = {
    "dev-clean": Archive(
        "42e2234ba48799c1f50f24a7926300a1",
        "76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3",
        337926286,
    ),
    "dev-other": Archive(
        "c8d0bcc9cca99d4f8b62fcc847357931",
        "12661c48e8c3fe1de2c1caa4c3e135193bfb1811584f11f569dd12645aa84365",
        314305928,
    ),
    "test-clean": Archive(
        "32fa31d27d2e1cad72775fee3f4849a9",
        "39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23",
        346663984,
    ),
    "test-other": Archive(
        "fb5a50374b501bb3bac4815ee91d3135",
        "d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29",
        328757843,
    ),
    "train-clean-100": Archive(
        "2a93770f6d5c6c964bc36631d331a522",
        "d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2",
        6387309499,
    ),
    "train-clean-360": Archive(
        "c0e676e450a7ff2f54aeade5171606fa",
        "146a56496217e96c14334a160df97fffedd6e0a04e66b9c5af0d40be3c792ecf",
    ),
    "train-other-500": Archive(
        "d1a0fd59409feb2c614ce4d30c387708",
        "ddb22f27f96ec163645d53215559df6aa36515f26e01dd70798188350adcb6d2",
    ),
}


class FetchError(LoadgenError):
    """The split could not be downloaded or unpacked; the message says why."""


class ChecksumError(FetchError):
    """The downloaded archive is not the published one."""


class UnsafeArchiveError(FetchError):
    """The archive holds a member that would land outside the target folder or is not a plain
    file or folder."""


def ensure_librispeech(
    split: str,
    cache_dir: Path | None = None,
    base_url: str | None = None,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    force: bool = False,
    progress: bool = True,
    retries: int = 5,
    retry_wait_s: float = 1.0,
) -> Path:
    """The unpacked split folder `<cache>/LibriSpeech/<split>`, fetched first if needed."""
    cache = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    target = cache / "LibriSpeech" / split
    if (target / COMPLETE_MARKER).is_file() and not force:
        return target
    expected = _expected(split, sha256, md5)
    url = f"{(base_url or OPENSLR_BASE_URL).rstrip('/')}/{split}.tar.gz"
    archive = cache / "downloads" / f"{split}.tar.gz"
    if force or not archive.is_file():
        download(url, archive, progress=progress, retries=retries, retry_wait_s=retry_wait_s)
    verify(archive, expected)
    unpack_split(archive, cache, split)
    return target


def _expected(split: str, sha256: str | None, md5: str | None) -> Archive:
    if sha256 or md5:
        known = LIBRISPEECH.get(split)
        return Archive(md5 or "", sha256, known.size if known and not sha256 else None)
    if split not in LIBRISPEECH:
        raise FetchError(
            f"unknown LibriSpeech split {split!r} (known: {', '.join(LIBRISPEECH)}); "
            "give its --sha256 or --md5 to fetch it anyway"
        )
    return LIBRISPEECH[split]


def download(
    url: str,
    dest: Path,
    *,
    progress: bool = True,
    retries: int = 5,
    retry_wait_s: float = 1.0,
    chunk_bytes: int = 1 << 20,
) -> Path:
    """Download url to dest through `dest.part`, resuming with a Range request after a broken
    transfer (up to `retries` times)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, progress, chunk_bytes)
            part.replace(dest)
            return dest
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            if isinstance(err, urllib.error.HTTPError) and err.code not in (
                408,
                429,
                500,
                502,
                503,
            ):
                raise FetchError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
            if attempt == retries:
                raise FetchError(
                    f"download of {url} failed after {retries} retries: {err}"
                ) from err
            done = part.stat().st_size if part.exists() else 0
            log.warning("download interrupted at %d bytes (%s); resuming", done, err)
            time.sleep(retry_wait_s * 2**attempt)  # back off before asking the server again
    raise AssertionError("unreachable")


def _transfer(url: str, part: Path, progress: bool, chunk_bytes: int) -> None:
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left after offset: the part is complete
            return
        raise
    with response:
        if offset and response.status != 206:  # the server ignored the range: start over
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with part.open("ab" if offset else "wb") as out:
            _copy(response, out, offset, total, progress, chunk_bytes, url)
    if total is not None and part.stat().st_size < total:
        raise http.client.IncompleteRead(b"", total - part.stat().st_size)


def _copy(
    source: BinaryIO,
    out: BinaryIO,
    offset: int,
    total: int | None,
    progress: bool,
    chunk_bytes: int,
    url: str,
) -> None:
    from tqdm import tqdm  # a dependency of transformers, so always there

    name = url.rsplit("/", 1)[-1]
    with tqdm(
        total=total, initial=offset, unit="B", unit_scale=True, desc=name, disable=not progress
    ) as bar:
        while chunk := source.read(chunk_bytes):
            out.write(chunk)
            bar.update(len(chunk))


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(archive: Path, expected: Archive) -> None:
    """Raise ChecksumError (and delete the archive, so it is downloaded again) unless it matches
    the expected sha256, or md5 where no sha256 is known."""
    algorithm, want = ("sha256", expected.sha256) if expected.sha256 else ("md5", expected.md5)
    got = file_digest(archive, algorithm)
    if got != want.lower():
        archive.unlink()
        raise ChecksumError(
            f"{archive.name}: {algorithm} {got} does not match the expected {want}; "
            "the archive was deleted (download it again, or pass --sha256 for a different file)"
        )
    log.info("%s: %s verified", archive.name, algorithm)


def check_member(member: tarfile.TarInfo) -> None:
    """Refuse what could escape the target folder or is not a plain file or folder."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or member.name.startswith(("/", "\\")):
        raise UnsafeArchiveError(f"archive member {member.name!r} points outside the target")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"archive member {member.name!r} is a link or special file")


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a .tar.gz member by member (one pass), checking each before it is written."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            check_member(member)
            if not (root / member.name).resolve().is_relative_to(root):
                raise UnsafeArchiveError(f"archive member {member.name!r} points outside")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12: belt and braces
                tar.extract(member, root, filter="data")
            else:
                tar.extract(member, root)


def unpack_split(archive: Path, cache: Path, split: str) -> Path:
    """Unpack `LibriSpeech/<split>/...` from archive into `<cache>/LibriSpeech/<split>`."""
    staging = cache / f".staging-{split}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        safe_extract(archive, staging)
        unpacked = staging / "LibriSpeech" / split
        if not unpacked.is_dir():
            raise FetchError(f"{archive.name} holds no LibriSpeech/{split}/ folder")
        target = cache / "LibriSpeech" / split
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        unpacked.rename(target)
        for extra in (staging / "LibriSpeech").glob("*.TXT"):  # README, SPEAKERS, LICENSE...
            if not (target.parent / extra.name).exists():
                extra.rename(target.parent / extra.name)
        (target / COMPLETE_MARKER).write_text(archive.name + "\n")
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)
