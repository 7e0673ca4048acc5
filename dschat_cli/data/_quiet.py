"""Silence datasets' tqdm bars while the data layer works: they would print from every rank and
bypass the rich console (steps show their own status line)."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Context manager and decorator; restores the previous setting."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
