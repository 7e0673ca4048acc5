"""The one rich console. Only rank 0 prints; workers whose output is piped through the launcher
still draw live progress when the user's terminal is a TTY (DSCHAT_FORCE_TERMINAL)."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.markup import escape
from rich.theme import Theme

_THEME = Theme({"ok": "green", "warn": "yellow", "err": "bold red", "dim": "dim", "metric": "cyan"})


def make_console(stderr: bool = False, enabled: bool = True) -> Console:
    force = os.environ.get("DSCHAT_FORCE_TERMINAL") == "1"
    width = None
    if force and os.environ.get("COLUMNS", "").isdigit():
        width = int(os.environ["COLUMNS"])
    return Console(theme=_THEME, stderr=stderr, force_terminal=True if force else None, width=width,
                   quiet=not enabled, highlight=False)


console = make_console()
err_console = make_console(stderr=True)


def set_rank(rank: int) -> None:
    """Silence the shared console on ranks other than 0 (errors still go to err_console)."""
    console.quiet = rank != 0


def error_line(where: str, message: str) -> None:
    """One line; paths and flags are printed verbatim (never read as rich markup)."""
    err_console.print(f"[err]error:[/err] {escape(str(where))}: {escape(str(message))}",
                      soft_wrap=True)


def warn_line(message: str) -> None:
    err_console.print(f"[warn]warning:[/warn] {escape(str(message))}", soft_wrap=True)


def is_interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def quiet_libraries() -> None:
    """Hide the loading/saving progress bars of transformers, huggingface_hub and datasets: dschat
    shows its own progress."""
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        from datasets.utils import logging as ds_logging

        ds_logging.disable_progress_bar()
        ds_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def plain_text(text: str):
    """Model or user text for a rich table: verbatim (no markup), control characters removed."""
    from rich.text import Text

    cleaned = "".join(ch if ch in "\n\t" or ord(ch) >= 32 and ord(ch) != 127 else "\ufffd"
                      for ch in text)
    return Text(cleaned)
