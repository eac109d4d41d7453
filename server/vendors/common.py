"""What the vendor edges share: language codes, prompts from phrase hints, refused fields,
WAV headers in front of "raw" audio, and G.711 streams. No protobuf here."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Iterable

from server.audio import Encoding, g711_to_linear16
from server.errors import InvalidArgumentError

# A WAV header larger than this before the first sample is not a header we'll wait for.
MAX_WAV_HEADER_BYTES = 64 * 1024


def primary_language(code: str) -> str | None:
    """ "en-US" -> "en"; "" -> None (the model's default or detection)."""
    return code.split("-")[0].split("_")[0].lower() or None


def prompt_from_phrases(phrase_lists: Iterable[Iterable[str]]) -> str:
    """Phrase hints (speech contexts) become Whisper's prompt: the decoder is conditioned on
    their spelling, the nearest thing Whisper has to a boosted vocabulary."""
    return ", ".join(p.strip() for phrases in phrase_lists for p in phrases if p.strip())


def refuse_if(condition: bool, field: str, why: str) -> None:
    """A field whose silent neglect would mislead the caller is refused, with the reason."""
    if condition:
        raise InvalidArgumentError(f"{field} is not supported: {why}")


def is_wav(content: bytes) -> bool:
    return content[:4] == b"RIFF" and content[8:12] == b"WAVE"


def wav_data_offset(head: bytes) -> int | None:
    """Where the samples start in a RIFF/WAVE file beginning with `head`; None while the
    "data" chunk header is not in `head` yet."""
    pos = 12
    while pos + 8 <= len(head):
        chunk_id, size = head[pos : pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
        if chunk_id == b"data":
            return pos + 8
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    return None


async def without_wav_header(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Stream audio with a WAV header in front (what Riva's file iterator and many Google
    samples send: the file's bytes as they are) -> the samples only."""
    head = b""
    passing = False  # the header is behind us (or there was none): chunks go through as is
    async for chunk in chunks:
        if passing:
            yield chunk
            continue
        head += chunk
        if len(head) < 12:
            continue
        offset = wav_data_offset(head) if is_wav(head) else 0
        if offset is None:
            if len(head) > MAX_WAV_HEADER_BYTES:
                raise InvalidArgumentError("the stream starts with a WAV header with no data chunk")
            continue
        passing = True
        if head[offset:]:
            yield head[offset:]
    if not passing and head and not is_wav(head):  # under 12 bytes in all: audio, no header
        yield head


async def linear16_chunks(chunks: AsyncIterator[bytes], encoding: Encoding) -> AsyncIterator[bytes]:
    """A raw stream in LINEAR16, mu-law or A-law -> LINEAR16 chunks (what `run_stream` reads)."""
    async for chunk in without_wav_header(chunks):
        yield chunk if encoding is Encoding.LINEAR16 else g711_to_linear16(chunk, encoding)
