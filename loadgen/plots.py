"""The one matplotlib set-up: the Agg backend (files only, no display), imported when a plot is
drawn, so that nothing else pays for matplotlib."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt
