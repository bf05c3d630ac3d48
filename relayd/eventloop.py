"""Which asyncio event loop relayd's processes run on."""

from __future__ import annotations

import asyncio
import gc
import os
from typing import Any


def event_loop_runner() -> Any:
    """``uvloop.run`` when uvloop imports, else ``asyncio.run``.

    uvloop's event loop costs less CPU per connection and per message (see
    docs/performance.md). ``RELAYD_EVENT_LOOP=asyncio`` forces the standard
    loop (for comparison, or should uvloop misbehave on a platform).
    """
    if os.environ.get("RELAYD_EVENT_LOOP", "") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run
    return asyncio.run


def event_loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def settle_heap() -> None:
    """Once started: leave what start-up built out of every later garbage collection.

    A started process holds some 40,000 long-lived objects the collector
    tracks (modules, config, compiled patterns); each full collection
    walked them all again, 3% of a small message's instructions. ``gc.freeze`` moves
    them to a generation the collector never scans; what sessions create
    afterwards is collected as before.
    """
    gc.collect()
    gc.freeze()
