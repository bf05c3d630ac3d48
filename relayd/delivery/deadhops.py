"""Next hops that refuse connections, suspended for a while.

When every address of a next hop refused the connection or did not
answer it, trying the same hop again for each message of a backlog
costs a connect (and its timeout) per message and tells nothing new.
Postfix marks such a destination dead and defers its mail with
"delivery temporarily suspended"; relayd does the same for one hop
(host and port): until the suspension ends, messages for it are
deferred at once with the reason of the failure, without a connection.

The suspension lasts the first retry interval at most (``[delivery]
retry``), so a message never waits longer than its own retry would have
made it wait, and a hop that comes back is used again as soon as that
retry is due. A session to the hop that does get through ends it early.
The table is bounded: one peer's many MX names cannot grow it without end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_HOLD = 60.0  # seconds, whatever the retry schedule says
MAX_ENTRIES = 10_000


@dataclass
class DeadHops:
    """(host, port) → (until, reason) of the hops whose every address refused us."""

    hold: float = MAX_HOLD
    clock: Callable[[], float] = time.monotonic
    _until: dict[tuple[str, int], tuple[float, str]] = field(default_factory=dict)

    def reason(self, host: str, port: int) -> str | None:
        """Why ``host:port`` is suspended, or None if it may be tried."""
        key = (host.lower(), port)
        entry = self._until.get(key)
        if entry is None:
            return None
        until, why = entry
        if self.clock() >= until:
            del self._until[key]
            return None
        return why

    def failed(self, host: str, port: int, why: str) -> None:
        """Every address of the hop refused or timed out: suspend it for ``hold`` seconds."""
        if self.hold <= 0:
            return
        if len(self._until) >= MAX_ENTRIES:
            self._forget_expired()
        if len(self._until) >= MAX_ENTRIES:
            del self._until[next(iter(self._until))]  # the oldest entry
        self._until[(host.lower(), port)] = (self.clock() + self.hold, why)

    def alive(self, host: str, port: int) -> None:
        """A session got through: the hop is tried normally again."""
        self._until.pop((host.lower(), port), None)

    def clear(self) -> None:
        """End every suspension (``relayctl queue flush``: the operator says try now)."""
        self._until.clear()

    def _forget_expired(self) -> None:
        now = self.clock()
        for key in [k for k, (until, _) in self._until.items() if until <= now]:
            del self._until[key]
