"""One outbox per spool directory and process, and the thread its calls run in."""

from __future__ import annotations

import threading
from pathlib import Path

from relayd import workers
from relayd.events.outbox import DB_NAME, Outbox

# Every outbox call from the event loop runs here: one thread, so the
# connection is never used by two at once and the loop never waits on disk.
POOL = workers.Pool("events", workers=1, queue=256)

_OPEN: dict[Path, Outbox] = {}
_LOCK = threading.Lock()


def outbox_for(spool: Path) -> Outbox:
    path = Path(spool) / DB_NAME
    with _LOCK:
        outbox = _OPEN.get(path)
        if outbox is None:
            outbox = _OPEN[path] = Outbox(path)
        return outbox
