"""Runaway decodes: on audio that isn't speech (noise, clipping, a tone) Whisper can fall into a
loop, one phrase over and over until its token limit, which costs the whole 440-token budget
of a window and gives text nobody said.

Whisper's reference decoding catches these afterwards (a transcript whose gzip compression
ratio is above 2.4 is retried at a higher temperature), after paying for the whole decode.
Here the loop is caught while it happens: a sequence stops once its last LOOP_SPAN tokens
repeat a phrase of at most MAX_PERIOD tokens, and the result keeps the text up to the loop
and the phrase once.
Pure functions on token lists, shared by both decoding paths.
"""

from __future__ import annotations

from collections.abc import Sequence

LOOP_SPAN = 32  # tokens that must repeat one phrase before the decode is stopped
MAX_PERIOD = 16  # longest phrase (in tokens) a loop is looked for with
CHECK_EVERY = 4  # the check runs every few tokens: a loop is caught a few tokens later


def loop_period(tokens: Sequence[int]) -> int | None:
    """The period of the loop the tokens end in, if their last LOOP_SPAN tokens are one
    phrase of at most MAX_PERIOD tokens repeated; else None."""
    n = len(tokens)
    if n < LOOP_SPAN + 1:
        return None
    tail = list(tokens[max(0, n - LOOP_SPAN - MAX_PERIOD) :])
    end = len(tail)
    for period in range(1, MAX_PERIOD + 1):
        if end - LOOP_SPAN - period < 0:
            break
        if tail[end - LOOP_SPAN :] == tail[end - LOOP_SPAN - period : end - period]:
            return period
    return None


def is_looping(tokens: Sequence[int]) -> bool:
    """Cheap per-step test: checked only every CHECK_EVERY tokens."""
    return len(tokens) % CHECK_EVERY == 0 and loop_period(tokens) is not None


def trim_loop(tokens: Sequence[int]) -> list[int]:
    """The tokens without their trailing loop: up to where it starts, and its phrase once."""
    period = loop_period(tokens)
    if period is None:
        return list(tokens)
    start = len(tokens) - period
    while start > 0 and tokens[start - 1] == tokens[start - 1 + period]:
        start -= 1
    return list(tokens[: start + period])
