"""Wrong-password counts in Redis, so a guesser spreading over nodes meets one budget.

The rules are relayd.policy.authguard's, unchanged: per address (IPv6 per
/64) 5 per 15 minutes counted from the start of each attempt, 3 at once;
per account 20 per hour except from addresses that logged in within 24
hours. Here they are two Lua scripts over sorted sets (attempt id scored by
time), one to decide and reserve, one to record the result. They run in
the same AUTH worker thread as the SQLite version, which this node falls
back to when Redis cannot be reached.
"""

from __future__ import annotations

import time

from relayd.cluster.store import Store
from relayd.policy.authguard import (
    STALE_RESERVATION,
    AuthGuard,
    Outcome,
    Ticket,
    account_key,
)
from relayd.policy.ratelimit import client_key

PREFIX = "relayd:auth:"

# KEYS: address failed, address running, account failed, account running,
# account logins (members: addresses), the id sequence.
# ARGV: now, failure_window, max_failures, max_concurrent, account_window,
# account_max_failures, trust_window, stale, address.
_BEGIN = """
local now = tonumber(ARGV[1])
local fw, maxf, maxc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local aw, amax = tonumber(ARGV[5]), tonumber(ARGV[6])
local tw, stale = tonumber(ARGV[7]), tonumber(ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - fw)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - stale)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - aw)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - stale)
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - tw)
local failed = redis.call('ZCARD', KEYS[1])
local running = redis.call('ZCARD', KEYS[2])
if failed + running >= maxf then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local first = now
  if oldest[2] then first = tonumber(oldest[2]) end
  return {'address', tostring(math.max(0, first + fw - now))}
end
if running >= maxc then return {'busy', '0'} end
if not redis.call('ZSCORE', KEYS[5], ARGV[9]) then
  if redis.call('ZCARD', KEYS[3]) + redis.call('ZCARD', KEYS[4]) >= amax then
    return {'account', '0'}
  end
end
local id = redis.call('INCR', KEYS[6])
redis.call('ZADD', KEYS[2], now, id)
redis.call('ZADD', KEYS[4], now, id)
redis.call('EXPIRE', KEYS[2], math.ceil(stale) + 1)
redis.call('EXPIRE', KEYS[4], math.ceil(stale) + 1)
return {'check', tostring(id)}
"""

# KEYS as for _BEGIN (without the sequence). ARGV: now, id, ok (0/1), address,
# failure_window, account_window, trust_window.
_FINISH = """
local now = tonumber(ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[2])
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[5], now, ARGV[4])
  redis.call('EXPIRE', KEYS[5], math.ceil(tonumber(ARGV[7])) + 1)
else
  redis.call('ZADD', KEYS[1], now, ARGV[2])
  redis.call('ZADD', KEYS[3], now, ARGV[2])
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[5])) + 1)
  redis.call('EXPIRE', KEYS[3], math.ceil(tonumber(ARGV[6])) + 1)
end
return redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[5]), '+inf')
"""

_OUTCOMES = {
    "address": Outcome.ADDRESS_BLOCKED,
    "busy": Outcome.BUSY,
    "account": Outcome.ACCOUNT_LOCKED,
    "check": Outcome.CHECK,
}


def _keys(address: str, account: str) -> list[str]:
    a, u = f"{PREFIX}a:{address}:", f"{PREFIX}u:{account}:"
    return [a + "failed", a + "running", u + "failed", u + "running", u + "logins"]


class SharedAuthGuard(AuthGuard):
    """AuthGuard counting in Redis; tickets with a negative attempt id were counted locally."""

    def __init__(self, local: AuthGuard, store: Store) -> None:
        super().__init__(local.path, local.limits, local.busy_wait)
        self.store = store

    def _begin(self, ip: str, name: str) -> Ticket:
        address, account = client_key(ip), account_key(name)
        lim = self.limits
        args = [
            time.time(), lim.failure_window, lim.max_failures, lim.max_concurrent,
            lim.account_window, lim.account_max_failures, lim.trust_window,
            STALE_RESERVATION, address,
        ]  # fmt: skip
        script = self.store.script(_BEGIN)
        keys = [*_keys(address, account), f"{PREFIX}seq"]
        answer = self.store.call("wrong passwords", lambda client: script(keys=keys, args=args))
        if answer is None:
            ticket = super()._begin(ip, name)
            if ticket.attempt is not None:  # mark it as this node's own
                ticket = Ticket(ticket.outcome, -ticket.attempt, ticket.retry_after,
                                ticket.address, ticket.account)  # fmt: skip
            return ticket
        kind, value = (part.decode() if isinstance(part, bytes) else str(part) for part in answer)
        outcome = _OUTCOMES[kind]
        if outcome is Outcome.CHECK:
            return Ticket(outcome, int(value), 0.0, address, account)
        return Ticket(outcome, None, float(value), address, account)

    def _finish(self, ticket: Ticket, ok: bool) -> int:
        if ticket.attempt is not None and ticket.attempt < 0:  # counted locally
            local = Ticket(ticket.outcome, -ticket.attempt, ticket.retry_after,
                           ticket.address, ticket.account)  # fmt: skip
            return super()._finish(local, ok)
        lim = self.limits
        args = [
            time.time(), ticket.attempt, 1 if ok else 0, ticket.address,
            lim.failure_window, lim.account_window, lim.trust_window,
        ]  # fmt: skip
        script = self.store.script(_FINISH)
        keys = _keys(ticket.address, ticket.account)
        count = self.store.call("wrong passwords", lambda client: script(keys=keys, args=args))
        return int(count) if count is not None else 0

    def _blocked(self, ip: str) -> bool:
        address = client_key(ip)
        key = f"{PREFIX}a:{address}:failed"
        since = time.time() - self.limits.failure_window
        count: object = self.store.call(
            "wrong passwords", lambda client: client.zcount(key, since, "+inf")
        )
        if count is None:
            return super()._blocked(ip)
        return isinstance(count, int) and count >= self.limits.max_failures
