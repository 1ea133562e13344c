"""Whether the Hugging Face hub can be reached now: checked before any download, because the hub client
spends minutes in retries on an offline machine."""

import os
import socket
from urllib.parse import urlparse


def offline_env() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any(str(f).lower() in {"1", "true", "yes", "on"} for f in flags)


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is on or the hub's host does not answer; a proxy is trusted to reach it."""
    if offline_env():
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
