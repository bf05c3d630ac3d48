"""Waiting for something a real process does, bounded: no test may hang."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(check: Callable[[], object], timeout: float = 15.0) -> None:
    """Poll ``check`` every 0.1 s until it is true; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError("condition not met in time")
