"""Can this run reach the Hugging Face hub? Asked once, on the user's side, before launch.

    hub.reachable()          # False at once in offline mode; else one bounded probe, remembered
    hub.assume(record.hub_reachable)   # a rank takes the user side's answer from the run record

Model and data loading ask `reachable()` before trying the network, so that a machine without
network fails in a second with a clear message instead of hanging in retries. The launching
process probes once (the pre-launch checks and the run record share the answer); the ranks do not
probe again: the worker hands them the recorded answer. `dschat doctor` probes afresh (`probe`).

Standard library only: the CLI imports this before anything heavy.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlsplit

_TRUE = ("1", "true", "yes", "on")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")

_answer: bool | None = None  # this process's answer, once known


def offline_variable() -> str | None:
    """The environment variable that puts the hub libraries offline, or None."""
    for var in OFFLINE_VARIABLES:
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return var
    return None


def probe(timeout: float = 3.0) -> bool:
    """A TCP connect to the hub (or the HTTPS proxy, or HF_ENDPOINT), bounded in time even if DNS
    hangs."""
    target = (os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
              or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    u = urlsplit(target if "://" in target else "http://" + target)
    host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
    ok: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except (OSError, ValueError):
            pass

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def reachable() -> bool:
    """Whether to use the network for hub models and data: never in offline mode; else the answer
    this process was given (`assume`) or got from its one probe."""
    global _answer
    if offline_variable():
        return False
    if _answer is None:
        _answer = probe()
    return _answer


def assume(value: bool) -> None:
    """Take an answer found elsewhere (a rank: the run record's) instead of probing."""
    global _answer
    _answer = bool(value)
