"""relayd with one experimental change applied in memory (``$WHATIF``, comma-separated).

``python -m bench.whatif_launch --config FILE`` runs relayd like ``relayd.cli``
after patching the named functions; relayd's files are never changed. The
patches reach into relayd's internals and follow them as of the commit named
in docs/performance.md: update them when those internals move.

- ``hold``: new mail is never scheduled (an upper bound for "held" mail).
- ``sched``: blocked deliveries wait in per-domain lists; a wake-up looks only
  at domains with a free slot.
- ``nogroup``: no group commit: one directory fsync per message.
- ``uvloop``: nothing to patch; the runner puts uvloop on the module path and
  relayd's daemon uses it when importable.
"""

from __future__ import annotations

import heapq
import os
import sys
from typing import Any


def _hold() -> None:
    from relayd import scheduler

    scheduler.Scheduler.add = lambda self, env: None  # type: ignore[method-assign]


def _sched() -> None:
    from relayd import scheduler

    def dispatch_due(self: Any) -> None:
        now = self._clock()
        waiting = self.__dict__.setdefault("_waiting", {})
        due, self._blocked = self._blocked, []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap))
        cap = max(1, self._config.delivery.per_domain_concurrency)
        limit = max(1, self._config.delivery.concurrency)
        for key in list(waiting):
            if all(self._per_domain[d] < cap for d in key):
                due.extend(waiting.pop(key))
        due.sort()
        for i, entry in enumerate(due):
            if self._stopping or len(self._tasks) >= limit:
                self._blocked.extend(due[i:])
                return
            env = self._current(entry)
            if env is None:
                continue
            domains = scheduler._domains(env)
            if all(self._per_domain[d] < cap for d in domains):
                self._start(env, domains)
            else:
                waiting.setdefault(frozenset(domains), []).append(entry)

    scheduler.Scheduler._dispatch_due = dispatch_due  # type: ignore[method-assign]


def _nogroup() -> None:
    from relayd.spool import groupcommit

    groupcommit.GroupCommitter.batch_size = 1


PATCHES = {"hold": _hold, "sched": _sched, "nogroup": _nogroup, "uvloop": None}


def main() -> int:
    for name in filter(None, os.environ.get("WHATIF", "").split(",")):
        patch = PATCHES[name]
        if patch is not None:
            patch()
    from relayd.cli import main as relayd_main

    return relayd_main()


if __name__ == "__main__":
    sys.exit(main())
