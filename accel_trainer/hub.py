"""The Hugging Face Hub, probed before any download: a name that needs the Hub fails in seconds,
naming the flag, when the Hub cannot be reached (not after a minute of retries)."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from .errors import DataError


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub's endpoint (``HF_ENDPOINT``) opens within ``timeout`` seconds."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def require_hub(flag: str, name: str, error: type[Exception] = DataError) -> None:
    """Fail in seconds, naming ``flag``, when ``name`` needs the Hub and the Hub cannot be reached
    (with ``HF_HUB_OFFLINE`` set, the local cache is tried instead)."""
    if not hub_offline() and not hub_reachable():
        raise error(f"{flag}={name!r}: the Hugging Face Hub is not reachable from here (no network?). Get it on a "
                    "machine with network (accel-trainer prepare-data for datasets, save_pretrained for tokenizers "
                    "and models) and pass the folder, or set HF_HUB_OFFLINE=1 to use a copy in the local Hugging "
                    "Face cache")
