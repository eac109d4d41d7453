"""`loadgen fetch` against a local HTTP server on loopback (port 0, Range support) serving a
tarball built here from ../shared/data/LibriSpeech: checksum, resume, unpack, refusals."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loadgen.cli import main
from loadgen.fetch import (
    COMPLETE_MARKER,
    LIBRISPEECH,
    ChecksumError,
    FetchError,
    UnsafeArchiveError,
    ensure_librispeech,
)
from tests.conftest import LIBRISPEECH as SHARED_LIBRISPEECH
from tests.conftest import require_data


@dataclass
class Served:
    """What the test server serves, and what it was asked."""

    files: dict[str, bytes]
    truncate_first: bool = False
    ranges: list[str | None] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    served: Served

    def do_GET(self) -> None:
        served = self.server.served  # type: ignore[attr-defined]
        body = served.files.get(self.path.lstrip("/"))
        served.ranges.append(self.headers.get("Range"))
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if served.truncate_first and len(served.ranges) == 1:
            # Promise the whole body, send a third of it, hang up: a broken download.
            self.wfile.write(body[: len(body) // 3])
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, Served]]:
    served = Served({})
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.served = served  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/resources/12", served
    server.shutdown()
    server.server_close()
    thread.join()


def split_tarball(split: str = "test-clean") -> bytes:
    """The official archive's layout: LibriSpeech/<split>/..., plus a top-level README."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        readme = b"LibriSpeech ASR corpus (test copy)\n"
        info = tarfile.TarInfo("LibriSpeech/README.TXT")
        info.size = len(readme)
        tar.addfile(info, io.BytesIO(readme))
        tar.add(SHARED_LIBRISPEECH / split, arcname=f"LibriSpeech/{split}")
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_verify_unpack(http_server, tmp_path: Path):
    require_data()
    base_url, served = http_server
    tarball = split_tarball()
    served.files["resources/12/test-clean.tar.gz"] = tarball
    split = ensure_librispeech(
        "test-clean", tmp_path, base_url, sha256=sha256(tarball), progress=False
    )
    assert split == tmp_path / "LibriSpeech" / "test-clean"
    assert (split / COMPLETE_MARKER).is_file()
    flacs = sorted(p.relative_to(split) for p in split.rglob("*.flac"))
    shared = SHARED_LIBRISPEECH / "test-clean"
    assert flacs == sorted(p.relative_to(shared) for p in shared.rglob("*.flac"))
    assert (tmp_path / "LibriSpeech" / "README.TXT").is_file()
    assert not list(tmp_path.glob(".staging-*"))
    # Present and complete: no second download.
    assert ensure_librispeech("test-clean", tmp_path, base_url, sha256="0" * 64) == split
    assert served.ranges == [None]


def test_broken_download_resumes_with_a_range_request(http_server, tmp_path: Path):
    require_data()
    base_url, served = http_server
    tarball = split_tarball()
    served.files["resources/12/test-clean.tar.gz"] = tarball
    served.truncate_first = True
    split = ensure_librispeech(
        "test-clean", tmp_path, base_url, md5=hashlib.md5(tarball).hexdigest(), progress=False,
        retry_wait_s=0,
    )  # fmt: skip
    assert served.ranges == [None, f"bytes={len(tarball) // 3}-"]
    assert len(list(split.rglob("*.flac"))) == 7
    assert (tmp_path / "downloads" / "test-clean.tar.gz").read_bytes() == tarball


def test_checksum_mismatch_is_an_error_and_deletes_the_archive(http_server, tmp_path: Path):
    require_data()
    base_url, served = http_server
    served.files["resources/12/test-clean.tar.gz"] = split_tarball()
    with pytest.raises(ChecksumError, match="does not match"):
        ensure_librispeech("test-clean", tmp_path, base_url, sha256="ab" * 32, progress=False)
    assert not (tmp_path / "downloads" / "test-clean.tar.gz").exists()
    assert not (tmp_path / "LibriSpeech").exists()


def test_known_splits_carry_published_checksums():
    assert LIBRISPEECH["test-clean"].md5 == "32fa31d27d2e1cad72775fee3f4849a9"
    assert LIBRISPEECH["test-other"].sha256 == (
        "d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29"
    )
    assert {"dev-clean", "dev-other", "test-clean", "test-other"} <= set(LIBRISPEECH)


def test_unknown_split_needs_a_checksum(tmp_path: Path):
    with pytest.raises(FetchError, match="unknown LibriSpeech split"):
        ensure_librispeech("train-clean-7", tmp_path, "http://127.0.0.1:9", progress=False)


def test_http_error_is_reported(http_server, tmp_path: Path):
    base_url, _ = http_server
    with pytest.raises(FetchError, match="HTTP 404"):
        ensure_librispeech("dev-clean", tmp_path, base_url, progress=False, retry_wait_s=0)


def evil_tarball(kind: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        if kind == "traversal":
            info = tarfile.TarInfo("LibriSpeech/test-clean/../../../escaped.txt")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        elif kind == "absolute":
            info = tarfile.TarInfo("/tmp/escaped-absolute.txt")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        else:
            info = tarfile.TarInfo("LibriSpeech/test-clean/link")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink"])
def test_unsafe_archives_are_refused(http_server, tmp_path: Path, kind: str):
    base_url, served = http_server
    tarball = evil_tarball(kind)
    served.files["resources/12/test-clean.tar.gz"] = tarball
    cache = tmp_path / "cache"
    with pytest.raises(UnsafeArchiveError):
        ensure_librispeech("test-clean", cache, base_url, sha256=sha256(tarball), progress=False)
    assert not list(tmp_path.rglob("escaped*"))
    assert not (cache / "LibriSpeech").exists()


def test_fetch_command(http_server, tmp_path: Path, capsys):
    require_data()
    base_url, served = http_server
    tarball = split_tarball("dev-clean")
    served.files["resources/12/dev-clean.tar.gz"] = tarball
    argv = ["fetch", "librispeech", "dev-clean", "--cache-dir", str(tmp_path)]
    argv += ["--base-url", base_url, "--sha256", sha256(tarball), "--no-progress"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "LibriSpeech" / "dev-clean")
    assert main([*argv[:-3], "--sha256", "00" * 32, "--force", "--no-progress"]) == 1
