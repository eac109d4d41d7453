"""A model id that only the Hugging Face hub has: fail in seconds, saying so, when the hub can't
be reached, instead of letting `from_pretrained` retry for minutes and end with a message that
never names the hub.

A hub id already in the local Hugging Face cache loads without the hub and is not checked.
Otherwise one TCP connection to the hub's endpoint (HF_ENDPOINT, huggingface.co by default)
must open within `PROBE_TIMEOUT_S`; HF_HUB_OFFLINE=1 (huggingface_hub reads it) fails at once.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0


class HubUnreachableError(RuntimeError):
    """The model needs the hub and the hub does not answer."""


def _cached(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


def _reachable(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def ensure_hub_model_available(
    model_id: str,
    builtins: tuple[str, ...],
    reachable: Callable[[str], bool] | None = None,
) -> None:
    """Return if `model_id` can load (cached, or the hub answers); else raise with what to do."""
    from huggingface_hub import constants

    if _cached(model_id):
        return
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    elif not (reachable or _reachable)(constants.ENDPOINT):
        why = f"{constants.ENDPOINT} did not answer within {PROBE_TIMEOUT_S:g} s"
    else:
        return
    raise HubUnreachableError(
        f"model {model_id!r} is not a built-in model or a local directory, so it would come "
        f"from the Hugging Face hub, which is unreachable ({why}). Use a built-in model "
        f"(--model {' or --model '.join(builtins)}: installed with the project, no network), "
        "or a local checkpoint directory (--model /path/to/model: a transformers or "
        "CTranslate2 Whisper folder)."
    )
