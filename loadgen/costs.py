"""The one cost function: dollars per 1,000 hours of audio (or of live streams) from a price per
hour and a measured throughput, and the parsing of `--price LABEL=DOLLARS_PER_HOUR`."""

from __future__ import annotations

import math
from collections.abc import Sequence

from loadgen.errors import UsageError

AUDIO_HOURS = 1000.0

SEED_PRICES = {
    "c5.xlarge": 0.17,  # 4 vCPU, the CPU row
    "g4dn.xlarge": 0.526,  # NVIDIA T4
    "p3.2xlarge": 3.06,  # NVIDIA V100
    "p4d.24xlarge/8": 4.096,  # one of the eight NVIDIA A100s of a p4d.24xlarge ($32.77/h)
}
"""The seed study's cards (a CPU, T4, V100, A100) as AWS instance types -> on-demand $/h in
us-east-1 (list prices; check them before relying on them). `study compare` uses them for a
study labelled so that carries no price of its own."""


def cost_per_1000h(price_per_hour: float | None, audio_s_per_s: float | None) -> float | None:
    """$ per 1,000 audio hours = price per hour x 1000 / RTFx; None without a price or a rate."""
    if price_per_hour is None or not audio_s_per_s or math.isnan(audio_s_per_s):
        return None
    return price_per_hour * AUDIO_HOURS / audio_s_per_s


def cost_per_1000_stream_h(price_per_hour: float | None, streams: float | None) -> float | None:
    """$ per 1,000 stream-hours: a host holding `streams` live streams serves that many hours of
    audio per hour."""
    if price_per_hour is None or not streams:
        return None
    return price_per_hour * AUDIO_HOURS / streams


def parse_prices(pairs: Sequence[str]) -> dict[str, float]:
    """['g5.xlarge=1.006', ...] -> {'g5.xlarge': 1.006}."""
    prices = {}
    for pair in pairs:
        label, sep, value = pair.rpartition("=")
        try:
            prices[label] = float(value)
        except ValueError:
            label = ""
        if not sep or not label:
            raise UsageError(f"--price takes LABEL=DOLLARS_PER_HOUR, not {pair!r}")
    return prices
