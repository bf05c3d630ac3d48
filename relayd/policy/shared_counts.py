"""Connection counts and rate limits shared by all relayd processes on one host.

Why. With acceptor processes (``[server] processes``) every process serves
its own share of the connections, yet SPEC §7's ``max_connections``,
``max_connections_per_ip`` and ``[rate_limits]`` are limits of relayd, not
of one process. The daemon therefore keeps these counts in one shared
memory segment (a memfd, handed to each acceptor like the listening
sockets) and every process counts there, under one POSIX record lock. The
lock is held for a few microseconds (a hash, a probe of a few slots) and
never across an await; the kernel releases it if its holder dies.

Layout. A header holds a random hashing key and each process's total of
open connections. Keys (client addresses, users, sender domains) are
stored as keyed 16-byte BLAKE2b digests, so a table slot has a fixed size
and a peer cannot aim many keys at one slot. A key lives within
:data:`PROBE` slots of its hash; nothing is ever deleted, a slot is simply
reused once it is empty (connections) or stale (rates).

- Connections: a slot holds the key, the number of open connections from
  it, and that number split by process *column*. When a process exits, the
  daemon zeroes its column, so a crashed acceptor's connections stop
  counting.
- Rates: one table per limit, each slot the same two-window counter as
  :mod:`relayd.policy.ratelimit`. When a key's slots are all busy, the
  least recently seen one is taken over: as with the in-memory tables, a
  flood can reset a quiet key's count, never keep a busy key from being
  counted.

While the daemon is the only process (no acceptor running), it skips the
lock: it sets :attr:`SharedCounts.alone` to False before it starts an
acceptor.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import mmap
import os
import secrets
import struct
import time
import weakref
from collections.abc import Iterator

from relayd.config import Limits, Rate, RateLimits
from relayd.policy.ratelimit import (
    DEFAULT_MAX_KEYS,
    LIMIT_NAMES,
    RateLimiter,
    _Window,
    client_key,
    too_many_connections,
)
from relayd.policy.verdict import Verdict

MAGIC = b"relayd01"
COLUMNS = 128  # the daemon is column 0; acceptors (old and new during a reload) the rest
PROBE = 16  # slots a key may live in, from its hash on
MIN_CONNECTION_SLOTS = 4096
# Connection slots per client the table is made for: with 16 probes, that
# many distinct clients always find a slot (tests/test_shared_counts.py).
SLOTS_PER_CLIENT = 4

# magic, hashing key, slot counts, open connections, and those per column
_HEADER = struct.Struct(f"<8s16sIII{COLUMNS}I")
_TOTAL_AT = 8 + 16 + 4 + 4
_TOTALS_AT = _TOTAL_AT + 4
_DIGEST = 16
_CONN_SLOT = _DIGEST + 4 + 4 * COLUMNS  # key, open connections, per column
_RATE = struct.Struct("<ddII")  # window start, last seen, current, previous
_RATE_SLOT = _DIGEST + _RATE.size
_ZERO = bytes(_DIGEST)
_U32 = struct.Struct("<I")


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class SharedCounts:
    """The shared segment: made by the daemon, opened by acceptors from its fd."""

    def __init__(self, fd: int, *, owner: bool) -> None:
        self.fd = fd
        self.alone = owner  # the daemon with no acceptor running: no lock needed
        size = os.fstat(fd).st_size
        self.map = mmap.mmap(fd, size)
        magic, hash_key, conn_slots, rate_slots, *_ = _HEADER.unpack_from(self.map)
        self.hash_key: bytes = hash_key
        self.conn_slots: int = conn_slots
        self.rate_slots: int = rate_slots
        if magic != MAGIC:
            raise ValueError("not a relayd shared counts segment")
        self.conn_at: int = mmap.PAGESIZE
        self.rate_at: int = self.conn_at + (self.conn_slots + PROBE) * _CONN_SLOT
        self._rate_size: int = (self.rate_slots + PROBE) * _RATE_SLOT
        self._digest = functools.lru_cache(maxsize=4096)(self._digest_of)

    @property
    def capacity(self) -> int:
        """Distinct clients at once the connection table was made for."""
        return self.conn_slots // SLOTS_PER_CLIENT

    @classmethod
    def create(cls, max_connections: int, max_rate_keys: int = DEFAULT_MAX_KEYS) -> SharedCounts:
        """A new, empty segment sized for ``max_connections`` distinct clients at once."""
        conn_slots = _pow2(max(MIN_CONNECTION_SLOTS, SLOTS_PER_CLIENT * max_connections))
        rate_slots = _pow2(max_rate_keys)
        size = (
            mmap.PAGESIZE
            + (conn_slots + PROBE) * _CONN_SLOT
            + len(LIMIT_NAMES) * (rate_slots + PROBE) * _RATE_SLOT
        )
        fd = os.memfd_create("relayd-counts", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)  # pages are allocated only when first written
        with mmap.mmap(fd, mmap.PAGESIZE) as head:
            _HEADER.pack_into(
                head, 0, MAGIC, secrets.token_bytes(16), conn_slots, rate_slots, 0, *([0] * COLUMNS)
            )
        made = cls(fd, owner=True)
        weakref.finalize(made, _close_quietly, fd)
        return made

    @classmethod
    def inherited(cls, fd: int) -> SharedCounts:
        """An acceptor's view of the daemon's segment (``fd`` passed at its start)."""
        return cls(fd, owner=False)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        if self.alone:
            yield
            return
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def digest(self, key: str) -> bytes:
        """The stored form of ``key`` (the last few thousand are remembered)."""
        return self._digest(key)

    def _digest_of(self, key: str) -> bytes:
        return hashlib.blake2b(key.encode(), digest_size=_DIGEST, key=self.hash_key).digest()

    # ---- connections --------------------------------------------------------

    def total(self) -> int:
        return int(_U32.unpack_from(self.map, _TOTAL_AT)[0])

    def column_total(self, column: int) -> int:
        """Connections open in the process owning ``column`` (no lock: one word, read)."""
        return int(_U32.unpack_from(self.map, _TOTALS_AT + 4 * column)[0])

    def _add_total(self, column: int, delta: int) -> None:
        for at in (_TOTAL_AT, _TOTALS_AT + 4 * column):
            _U32.pack_into(self.map, at, max(0, _U32.unpack_from(self.map, at)[0] + delta))

    def connection_slot(self, digest: bytes, create: bool) -> int | None:
        """Offset of the slot counting ``digest``; with ``create``, an empty one if none."""
        m, start = self.map, int.from_bytes(digest[:4], "little") & (self.conn_slots - 1)
        free = None
        for i in range(start, start + PROBE):
            at = self.conn_at + i * _CONN_SLOT
            if m[at : at + _DIGEST] == digest:
                return at
            if free is None and _U32.unpack_from(m, at + _DIGEST)[0] == 0:
                free = at
        if create and free is not None:
            m[free : free + _DIGEST] = digest
        return free if create else None

    def open_from(self, at: int) -> int:
        return int(_U32.unpack_from(self.map, at + _DIGEST)[0])

    def add_connection(self, at: int, column: int, delta: int) -> None:
        # Clamped at 0: a process killed between these writes must not leave
        # a count that a later release would take below zero.
        col = at + _DIGEST + 4 + 4 * column
        mine = _U32.unpack_from(self.map, col)[0] + delta
        _U32.pack_into(self.map, col, max(0, mine))
        _U32.pack_into(self.map, at + _DIGEST, max(0, self.open_from(at) + delta))
        self._add_total(column, delta)

    def forget_column(self, column: int) -> None:
        """A process has exited: its connections no longer count.

        The totals are recounted from the slots, so a process killed halfway
        through an update leaves nothing wrong behind.
        """
        with self.locked():
            m, total = self.map, 0
            for i in range(self.conn_slots + PROBE):
                at = self.conn_at + i * _CONN_SLOT
                if not self.open_from(at):
                    continue
                col = at + _DIGEST + 4 + 4 * column
                _U32.pack_into(m, col, 0)
                left = sum(struct.unpack_from(f"<{COLUMNS}I", m, at + _DIGEST + 4))
                _U32.pack_into(m, at + _DIGEST, left)
                total += left
            _U32.pack_into(m, _TOTALS_AT + 4 * column, 0)
            _U32.pack_into(m, _TOTAL_AT, total)

    def connection_keys(self) -> int:
        m = self.map
        return sum(
            1
            for i in range(self.conn_slots + PROBE)
            if _U32.unpack_from(m, self.conn_at + i * _CONN_SLOT + _DIGEST)[0]
        )

    # ---- rates --------------------------------------------------------------

    def rate_slot(self, table: int, digest: bytes, now: float, width: float) -> int:
        """The slot of ``digest`` in rate table ``table``, taking over the stalest if new."""
        m = self.map
        base = self.rate_at + table * self._rate_size
        start = int.from_bytes(digest[:4], "little") & (self.rate_slots - 1)
        best, best_seen = 0, float("inf")
        for i in range(start, start + PROBE):
            at = base + i * _RATE_SLOT
            held = m[at : at + _DIGEST]
            if held == digest:
                return at
            seen = -1.0 if held == _ZERO else _RATE.unpack_from(m, at + _DIGEST)[1]
            if now - seen >= 2 * width:
                seen = -1.0  # stale: as good as empty
            if seen < best_seen:
                best, best_seen = at, seen
        m[best : best + _DIGEST] = digest
        _RATE.pack_into(m, best + _DIGEST, now, now, 0, 0)
        return best

    def find_rate_slot(self, table: int, digest: bytes) -> int | None:
        m = self.map
        base = self.rate_at + table * self._rate_size
        start = int.from_bytes(digest[:4], "little") & (self.rate_slots - 1)
        for i in range(start, start + PROBE):
            at = base + i * _RATE_SLOT
            if m[at : at + _DIGEST] == digest:
                return at
        return None

    def load_window(self, at: int) -> _Window:
        start, seen, current, previous = _RATE.unpack_from(self.map, at + _DIGEST)
        window = _Window(start)
        window.seen, window.current, window.previous = seen, current, previous
        return window

    def store_window(self, at: int, window: _Window) -> None:
        _RATE.pack_into(
            self.map, at + _DIGEST, window.start, window.seen, window.current, window.previous
        )

    def rate_keys(self, table: int, now: float, width: float) -> int:
        m, base, count = self.map, self.rate_at + table * self._rate_size, 0
        for i in range(self.rate_slots + PROBE):
            at = base + i * _RATE_SLOT
            if (
                m[at : at + _DIGEST] != _ZERO
                and now - _RATE.unpack_from(m, at + _DIGEST)[1] < 2 * width
            ):
                count += 1
        return count


class SharedConnectionCounter:
    """:class:`ConnectionCounter`'s limits (same replies), counted across every process."""

    def __init__(self, shared: SharedCounts, column: int, max_total: int, max_per_ip: int) -> None:
        self.shared = shared
        self.column = column
        self.max_total = max_total
        self.max_per_ip = max_per_ip

    def reconfigure(self, limits: Limits) -> None:
        """New maxima apply to new connections; open ones stay counted."""
        self.max_total = limits.max_connections
        self.max_per_ip = limits.max_connections_per_ip

    @property
    def total(self) -> int:
        return self.shared.total()

    def count(self, ip: str) -> int:
        shared = self.shared
        with shared.locked():
            at = shared.connection_slot(shared.digest(client_key(ip)), create=False)
            return 0 if at is None else shared.open_from(at)

    def tracked(self) -> int:
        with self.shared.locked():
            return self.shared.connection_keys()

    def acquire(self, ip: str) -> Verdict:
        key = client_key(ip)
        shared = self.shared
        with shared.locked():
            if shared.total() >= self.max_total:
                return too_many_connections()
            at = shared.connection_slot(shared.digest(key), create=True)
            if at is None:  # every slot this key may use is busy: as good as full
                return too_many_connections()
            if shared.open_from(at) >= self.max_per_ip:
                return too_many_connections(key)
            shared.add_connection(at, self.column, 1)
        return None

    def release(self, ip: str) -> None:
        shared = self.shared
        with shared.locked():
            at = shared.connection_slot(shared.digest(client_key(ip)), create=False)
            if at is None:
                return
            col = at + _DIGEST + 4 + 4 * self.column
            if _U32.unpack_from(shared.map, col)[0] == 0:
                return  # not acquired here (or already released): never go negative
            shared.add_connection(at, self.column, -1)


class _SharedTable:
    """One limit's windows in the segment, with :class:`ratelimit._Table`'s interface."""

    def __init__(self, shared: SharedCounts, index: int) -> None:
        self.shared = shared
        self.index = index

    def expire(self, now: float, width: float) -> None:
        pass  # a stale slot is reused in place

    def wait(self, key: str, now: float, rate: Rate) -> float:
        at = self.shared.find_rate_slot(self.index, self.shared.digest(key))
        if at is None:
            return 0.0 if rate.count >= 1 else float("inf")
        window = self.shared.load_window(at)
        window.roll(now, rate.per_seconds)
        return window.wait(now, rate)

    def touch(self, key: str, now: float) -> None:
        at = self.shared.find_rate_slot(self.index, self.shared.digest(key))
        if at is not None:
            window = self.shared.load_window(at)
            window.seen = now
            self.shared.store_window(at, window)

    def record(self, key: str, now: float, rate: Rate) -> None:
        at = self.shared.rate_slot(self.index, self.shared.digest(key), now, rate.per_seconds)
        window = self.shared.load_window(at)
        window.roll(now, rate.per_seconds)
        window.current += 1
        window.seen = now
        self.shared.store_window(at, window)


class SharedRateLimiter(RateLimiter):
    """:class:`RateLimiter`'s sliding windows, counted across every process."""

    def __init__(self, limits: RateLimits, shared: SharedCounts) -> None:
        super().__init__(limits)
        self.shared = shared
        self._tables = {
            name: _SharedTable(shared, i)  # type: ignore[misc]
            for i, name in enumerate(LIMIT_NAMES)
        }

    def reconfigure(self, limits: RateLimits) -> None:
        """Take new limits on reload; counts so far are kept (stale ones age out in place)."""
        self.limits = limits

    def tracked(self) -> int:
        now, total = time.time(), 0
        with self.shared.locked():
            for i, name in enumerate(LIMIT_NAMES):
                rate = getattr(self.limits, name)
                width = rate.per_seconds if rate is not None else 3600.0
                total += self.shared.rate_keys(i, now, width)
        return total

    def _exclusive(self) -> contextlib.AbstractContextManager[object]:
        """Other processes count in the same windows: one check at a time, host-wide."""
        return self.shared.locked()


__all__ = [
    "COLUMNS",
    "SharedConnectionCounter",
    "SharedCounts",
    "SharedRateLimiter",
]
