"""Message rate limits counted in Redis, so ``per_user = "300/hour"`` is 300 across all nodes.

The same sliding-window estimate as one node's (relayd.policy.ratelimit):
the count of the current fixed window plus the previous one's, weighted by
how much of it still overlaps. Windows are aligned on the Unix epoch, so
every node agrees which window ``now`` is in. One Lua script reads every
limit that applies and, when none is reached and the message is to be
counted, increments them all: check and count are one atomic step across
nodes, as they are one step without an ``await`` on a single node.
"""

from __future__ import annotations

import math

from relayd.cluster.store import Store
from relayd.config import RateLimits
from relayd.policy.ratelimit import DEFAULT_MAX_KEYS, RateLimiter, _Hit, _refusal, _Window
from relayd.policy.verdict import Verdict

PREFIX = "relayd:rl:"

# KEYS: current and previous window of each limit, in pairs. ARGV: record (0/1),
# then per limit: count, width, and how far into the current window now is (0..1).
_SCRIPT = """
local record = tonumber(ARGV[1])
local counts = {}
local blocked = false
for i = 1, #KEYS / 2 do
  local current = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
  local previous = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
  local limit = tonumber(ARGV[3 * i - 1])
  local into = tonumber(ARGV[3 * i + 1])
  local estimate = previous * math.max(0, 1 - into) + current
  if estimate > limit - 1 + 1e-9 then blocked = true end
  counts[2 * i - 1] = current
  counts[2 * i] = previous
end
if record == 1 and not blocked then
  for i = 1, #KEYS / 2 do
    redis.call('INCR', KEYS[2 * i - 1])
    redis.call('EXPIRE', KEYS[2 * i - 1], math.ceil(2 * tonumber(ARGV[3 * i])) + 1)
  end
end
return counts
"""


class SharedRateLimiter(RateLimiter):
    """A RateLimiter whose counts live in Redis; this node's own when Redis is down.

    ``acheck`` (what sessions call) asks Redis with the asyncio client; the
    inherited synchronous ``check`` is the node-local fallback.
    """

    def __init__(self, limits: RateLimits, store: Store, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        super().__init__(limits, max_keys)
        self.store = store

    async def acheck(
        self,
        now: float,
        ip: str,
        user: str | None = None,
        sender_domain: str | None = None,
        *,
        record: bool = True,
    ) -> Verdict:
        """Checked (and counted) in Redis; by this node alone while the store is down."""
        applicable = self._applicable(ip, user, sender_domain)
        if not applicable:
            return None
        keys: list[str] = []
        args: list[float | int] = [1 if record else 0]
        starts: list[float] = []
        for name, key, rate in applicable:
            width = rate.per_seconds
            index = math.floor(now / width)
            keys += [f"{PREFIX}{name}:{key}:{index}", f"{PREFIX}{name}:{key}:{index - 1}"]
            args += [rate.count, width, (now - index * width) / width]
            starts.append(index * width)
        script = self.store.script(_SCRIPT, asynchronous=True)
        counts = await self.store.acall("rate limits", lambda _: script(keys=keys, args=args))
        if counts is None:  # the store is down: this node counts alone meanwhile
            return self.check(now, ip, user, sender_domain, record=record)
        hits: list[_Hit] = []
        for i, (name, key, rate) in enumerate(applicable):
            window = _Window(starts[i])
            window.current, window.previous = int(counts[2 * i]), int(counts[2 * i + 1])
            wait = window.wait(now, rate)
            if wait > 0:
                hits.append(_Hit(name, key, rate, wait))
        if hits:
            return _refusal(max(hits, key=lambda hit: hit.wait))
        return None
