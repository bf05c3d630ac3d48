"""Rate limits and connection counts (wrong passwords: relayd.policy.authguard).

Message limits use a sliding-window counter per key: the count in the
current fixed window plus the previous window's count weighted by how much
of it still overlaps the sliding window. That is two integers per key, yet
it never lets much more than the limit through in any window, and it gives
an exact "try again in N seconds" under its own model. Tables are kept in
least-recently-used order: idle keys expire after two windows, and when a
flood of distinct clients fills a table to its cap the least recently seen
key is dropped. Memory is therefore bounded; the price is that a flood can
reset the count of a quiet key, never that a busy one escapes its limit
for long.

IPv6 clients are counted per /64, since one host usually holds a whole
/64 and could otherwise change address for every message.

All state lives in plain objects driven by an explicit ``now`` (monotonic
seconds), so tests use a fake clock and nothing here sleeps or locks: the
session calls these from the event loop only.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass

from relayd.config import Limits, Rate, RateLimits
from relayd.policy.verdict import Refuse, Verdict

DEFAULT_MAX_KEYS = 50_000

LIMIT_NAMES = ("per_ip", "per_user", "per_sender_domain")

# Slack for float rounding, so a client coming back exactly when told is let in.
_EPSILON = 1e-9


@functools.lru_cache(maxsize=4096)
def client_key(ip: str) -> str:
    """The key a client is counted under: its IPv4 address, or its IPv6 /64 (cached)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip.lower()
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def rate_text(rate: Rate) -> str:
    """``Rate(100, 3600)`` → "100/hour" (the text the operator wrote, when known)."""
    if rate.text:
        return rate.text
    units = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day"}
    unit = units.get(float(rate.per_seconds))
    return f"{rate.count}/{unit}" if unit else f"{rate.count}/{rate.per_seconds:g}s"


class _Window:
    """Counts in the current and the previous fixed window of one key."""

    __slots__ = ("current", "previous", "seen", "start")

    def __init__(self, now: float) -> None:
        self.start = now
        self.current = 0
        self.previous = 0
        self.seen = now

    def roll(self, now: float, width: float) -> None:
        """Move the windows forward to the one containing ``now``."""
        steps = math.floor((now - self.start) / width) if now > self.start else 0
        if steps >= 2:
            self.previous, self.current = 0, 0
        elif steps == 1:
            self.previous, self.current = self.current, 0
        self.start += steps * width

    def estimate(self, now: float, width: float) -> float:
        overlap = 1.0 - (now - self.start) / width
        return self.previous * max(0.0, overlap) + self.current

    def wait(self, now: float, rate: Rate) -> float:
        """Seconds until one more message fits (0 if one fits now)."""
        width, room = rate.per_seconds, rate.count - 1
        if self.estimate(now, width) <= room + _EPSILON:
            return 0.0
        if self.current <= room and self.previous > 0:
            free_at = self.start + width * (1.0 - (room - self.current) / self.previous)
        else:  # only the next window can have room
            share = max(0.0, 1.0 - room / self.current) if self.current else 0.0
            free_at = self.start + width + width * share
        return max(0.0, free_at - now)


class _Table:
    """One limit's windows, per key, bounded to ``max_keys`` in LRU order."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.windows: OrderedDict[str, _Window] = OrderedDict()

    def expire(self, now: float, width: float) -> None:
        while self.windows:
            oldest = next(iter(self.windows.values()))
            if now - oldest.seen < 2 * width:
                break
            self.windows.popitem(last=False)

    def wait(self, key: str, now: float, rate: Rate) -> float:
        window = self.windows.get(key)
        if window is None:
            return 0.0 if rate.count >= 1 else math.inf
        window.roll(now, rate.per_seconds)
        return window.wait(now, rate)

    def touch(self, key: str, now: float) -> None:
        """Mark a refused key as recently seen, so a flood cannot evict it."""
        window = self.windows.get(key)
        if window is not None:
            window.seen = now
            self.windows.move_to_end(key)

    def record(self, key: str, now: float, rate: Rate) -> None:
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = _Window(now)
            while len(self.windows) > self.max_keys:
                self.windows.popitem(last=False)
        window.roll(now, rate.per_seconds)
        window.current += 1
        window.seen = now
        self.windows.move_to_end(key)


@dataclass(frozen=True)
class _Hit:
    name: str
    key: str
    rate: Rate
    wait: float


class RateLimiter:
    """Message limits per client IP, per authenticated user and per sender domain.

    They apply to every client, ``[relay] networks`` included: a compromised
    host inside the network is exactly what they are for.
    """

    def __init__(self, limits: RateLimits, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.limits = limits
        self.max_keys = max_keys
        self._tables = {name: _Table(max_keys) for name in LIMIT_NAMES}

    def reconfigure(self, limits: RateLimits) -> None:
        """Take new limits on reload; counts so far are kept."""
        self.limits = limits
        for name in LIMIT_NAMES:
            if getattr(limits, name) is None:
                self._tables[name].windows.clear()

    def tracked(self) -> int:
        """Keys held across all limits (for tests and metrics)."""
        return sum(len(table.windows) for table in self._tables.values())

    def _applicable(
        self, ip: str, user: str | None, sender_domain: str | None
    ) -> list[tuple[str, str, Rate]]:
        keys = {
            "per_ip": client_key(ip),
            "per_user": user.lower() if user else None,
            "per_sender_domain": sender_domain.lower().rstrip(".") if sender_domain else None,
        }
        out: list[tuple[str, str, Rate]] = []
        for name in LIMIT_NAMES:
            rate, key = getattr(self.limits, name), keys[name]
            if rate is not None and key:
                out.append((name, key, rate))
        return out

    def check(
        self,
        now: float,
        ip: str,
        user: str | None = None,
        sender_domain: str | None = None,
        *,
        record: bool = True,
    ) -> Verdict:
        """Refuse with 450 4.7.1 if any limit is reached; otherwise count this message.

        A refused message is not counted, so a client retrying too early
        does not push its own release further away. With ``record=False``
        nothing is counted: the session checks so at MAIL, then checks and
        counts in one step at end of DATA, so transactions refused in
        between (SPF, DMARC, size) do not use up the client's limit.
        """
        applicable = self._applicable(ip, user, sender_domain)
        if not applicable:
            return None
        with self._exclusive():
            return self._check(now, applicable, record)

    def _exclusive(self) -> contextlib.AbstractContextManager[object]:
        """Held while one check reads and counts: nothing here, as one loop calls it."""
        return contextlib.nullcontext()

    def _check(self, now: float, applicable: list[tuple[str, str, Rate]], record: bool) -> Verdict:
        hits: list[_Hit] = []
        for name, key, rate in applicable:
            table = self._tables[name]
            table.expire(now, rate.per_seconds)
            wait = table.wait(key, now, rate)
            if wait > 0:
                hits.append(_Hit(name, key, rate, wait))
                table.touch(key, now)
        if hits:
            return _refusal(max(hits, key=lambda hit: hit.wait))
        if record:
            for name, key, rate in applicable:
                self._tables[name].record(key, now, rate)
        return None

    async def acheck(
        self,
        now: float,
        ip: str,
        user: str | None = None,
        sender_domain: str | None = None,
        *,
        record: bool = True,
    ) -> Verdict:
        """:meth:`check` for sessions; a shared limiter (relayd.cluster) asks its store here."""
        return self.check(now, ip, user, sender_domain, record=record)


def _refusal(hit: _Hit) -> Refuse:
    seconds = math.ceil(hit.wait) if math.isfinite(hit.wait) else 0
    label = hit.name.replace("_", " ")
    return Refuse(
        450,
        "4.7.1",
        f"rate limit {label} ({rate_text(hit.rate)}) reached for {hit.key}, "
        f"try again in {seconds}s",
    )


def too_many_connections(key: str | None = None) -> Refuse:
    """The 421 for a connection over ``max_connections`` (or, with ``key``, per client)."""
    who = f" from {key}" if key else ""
    return Refuse(421, "4.7.0", f"too many connections{who}, try again later")


class ConnectionCounter:
    """Open connections in total and per client, against ``[limits]``.

    Memory is bounded by the connections themselves: a client's entry goes
    away with its last connection.
    """

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self._per_ip: dict[str, int] = {}

    @classmethod
    def from_config(cls, limits: Limits) -> ConnectionCounter:
        return cls(limits.max_connections, limits.max_connections_per_ip)

    def reconfigure(self, limits: Limits) -> None:
        """New maxima apply to new connections; open ones stay counted."""
        self.max_total = limits.max_connections
        self.max_per_ip = limits.max_connections_per_ip

    def count(self, ip: str) -> int:
        return self._per_ip.get(client_key(ip), 0)

    def tracked(self) -> int:
        return len(self._per_ip)

    def acquire(self, ip: str) -> Verdict:
        """Count a new connection, or refuse it with 421 4.7.0 (nothing is counted then)."""
        key = client_key(ip)
        if self.total >= self.max_total:
            return too_many_connections()
        if self._per_ip.get(key, 0) >= self.max_per_ip:
            return too_many_connections(key)
        self.total += 1
        self._per_ip[key] = self._per_ip.get(key, 0) + 1
        return None

    def release(self, ip: str) -> None:
        """Forget one connection counted by a successful :meth:`acquire`."""
        key = client_key(ip)
        left = self._per_ip.get(key, 0) - 1
        if left < 0:
            return  # not acquired (or already released): never go negative
        self.total -= 1
        if left:
            self._per_ip[key] = left
        else:
            del self._per_ip[key]


__all__ = [
    "DEFAULT_MAX_KEYS",
    "LIMIT_NAMES",
    "ConnectionCounter",
    "RateLimiter",
    "client_key",
    "rate_text",
    "too_many_connections",
]
