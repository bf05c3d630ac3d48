"""Password guessing: wrong passwords counted per address and per account (SPEC §7).

Every process that answers AUTH (the daemon and its acceptor processes,
``[server] processes``) counts in one place, a small SQLite database in the
spool directory (``auth.db``), so a guesser gains nothing by opening more
connections: the kernel spreads them over the processes, the count stays one.

The rules, each checked before a password is:

- address (IPv4, or IPv6 per /64): at most ``max_failures`` (5) wrong
  passwords per ``failure_window`` (15 minutes); then ``421 4.7.0`` and the
  connection is closed. An attempt counts from the moment it starts: a slot
  is reserved before the hash runs and given back only when the password
  was right, so twenty parallel connections still get five checks;
- address: at most ``MAX_CONCURRENT`` (3) checks at once; a further AUTH
  waits up to ``BUSY_WAIT`` seconds for one to finish, then gets
  ``454 4.7.0``;
- account: at most ``ACCOUNT_MAX_FAILURES`` (20) wrong passwords per
  ``ACCOUNT_WINDOW`` (1 hour) from all addresses together; beyond that AUTH
  for it gets ``454 4.7.0`` without a check, except from an address that
  logged into that account within ``TRUST_WINDOW`` (24 hours).

A successful login gives back its own slot and marks the address as known
for that account; it never clears earlier failures of the address or of any
account. Rows expire with their windows, and the tables are capped at
``MAX_ROWS`` each (the oldest finished rows go first), so the file stays
small whatever a flood of addresses and names does.

Why SQLite rather than the daemon's socketpair: the check-and-reserve must
be atomic across processes, which one ``BEGIN IMMEDIATE`` transaction gives
for free (WAL, a busy timeout); counts survive a restart, so restarting
relayd does not hand a guesser a fresh budget; and an acceptor whose daemon
is busy or being replaced still answers correctly. Every call runs in one
dedicated thread (relayd.workers.AUTHDB), never on the event loop.

:class:`AuthLedger` is the whole policy, driven by an explicit ``now`` (Unix
seconds, shared by all processes); :class:`AuthGuard` is the asynchronous
face sessions use.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from relayd import sqlitedb, workers
from relayd.config import AuthConfig
from relayd.log import event
from relayd.policy.ratelimit import client_key

DB_NAME = "auth.db"
MAX_CONCURRENT = 3
BUSY_WAIT = 10.0
ACCOUNT_MAX_FAILURES = 20
ACCOUNT_WINDOW = 3600.0
TRUST_WINDOW = 86400.0
# A reservation older than this belongs to a process that died mid-check.
STALE_RESERVATION = 120.0
MAX_ROWS = 100_000
MAX_ACCOUNT_LENGTH = 320
BASE_DELAY = 0.5
MAX_DELAY = 8.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    address TEXT NOT NULL,
    account TEXT NOT NULL,
    at REAL NOT NULL,
    running INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_address ON attempts (address, at);
CREATE INDEX IF NOT EXISTS attempts_account ON attempts (account, at);
CREATE INDEX IF NOT EXISTS attempts_at ON attempts (at);
CREATE TABLE IF NOT EXISTS logins (
    address TEXT NOT NULL,
    account TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (address, account)
);
CREATE INDEX IF NOT EXISTS logins_at ON logins (at);
"""


class Outcome(enum.Enum):
    CHECK = "check"  # go ahead: a slot is reserved
    ADDRESS_BLOCKED = "address"  # 421 4.7.0, close
    BUSY = "busy"  # too many checks at once from the address: 454 4.7.0
    ACCOUNT_LOCKED = "account"  # 454 4.7.0 without a check
    UNAVAILABLE = "unavailable"  # the database failed: 454 4.7.0


@dataclass(frozen=True)
class Ticket:
    outcome: Outcome
    attempt: int | None = None  # the reserved row, for finish()
    retry_after: float = 0.0
    address: str = ""
    account: str = ""


@dataclass(frozen=True)
class Limits:
    max_failures: int = 5
    failure_window: float = 900.0
    max_concurrent: int = MAX_CONCURRENT
    account_max_failures: int = ACCOUNT_MAX_FAILURES
    account_window: float = ACCOUNT_WINDOW
    trust_window: float = TRUST_WINDOW
    max_rows: int = MAX_ROWS

    @classmethod
    def from_config(cls, cfg: AuthConfig) -> Limits:
        return cls(max(1, cfg.max_failures), cfg.failure_window)


def account_key(name: str) -> str:
    return name.lower()[:MAX_ACCOUNT_LENGTH]


class AuthLedger:
    """The counts, in SQLite; every method is one transaction at time ``now``."""

    def __init__(self, path: Path | str, limits: Limits | None = None) -> None:
        self.path = str(path)
        self.limits = limits or Limits()
        self._lock = threading.Lock()
        self._db = sqlitedb.connect(self.path, _SCHEMA, timeout=5.0, synchronous="NORMAL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Cursor]:
        return sqlitedb.transaction(self._lock, self._db)

    def _expire(self, cur: sqlite3.Cursor, now: float) -> None:
        keep = max(self.limits.failure_window, self.limits.account_window)
        cur.execute("DELETE FROM attempts WHERE running = 0 AND at < ?", (now - keep,))
        cur.execute("DELETE FROM attempts WHERE running = 1 AND at < ?", (now - STALE_RESERVATION,))
        cur.execute("DELETE FROM logins WHERE at < ?", (now - self.limits.trust_window,))

    def _cap(self, cur: sqlite3.Cursor) -> None:
        """Bound the tables: the oldest finished rows go first."""
        cap = self.limits.max_rows
        cur.execute(
            "DELETE FROM attempts WHERE running = 0 AND id <= (SELECT max(id) FROM attempts) - ?",
            (cap,),
        )
        cur.execute("DELETE FROM logins WHERE rowid <= (SELECT max(rowid) FROM logins) - ?", (cap,))

    def begin(self, now: float, ip: str, name: str) -> Ticket:
        """Decide whether this password may be checked; if so, reserve its slot."""
        address, account = client_key(ip), account_key(name)
        lim = self.limits
        with self._transaction() as cur:
            self._expire(cur, now)
            used, running, oldest = cur.execute(
                "SELECT count(*), coalesce(sum(running), 0), min(at) FROM attempts "
                "WHERE address = ? AND (running = 1 OR at >= ?)",
                (address, now - lim.failure_window),
            ).fetchone()
            if used >= lim.max_failures:
                retry = max(0.0, (oldest or now) + lim.failure_window - now)
                return Ticket(Outcome.ADDRESS_BLOCKED, None, retry, address, account)
            if running >= lim.max_concurrent:
                return Ticket(Outcome.BUSY, None, 0.0, address, account)
            trusted = cur.execute(
                "SELECT 1 FROM logins WHERE address = ? AND account = ? AND at >= ?",
                (address, account, now - lim.trust_window),
            ).fetchone()
            if trusted is None:
                (failed,) = cur.execute(
                    "SELECT count(*) FROM attempts WHERE account = ? AND (running = 1 OR at >= ?)",
                    (account, now - lim.account_window),
                ).fetchone()
                if failed >= lim.account_max_failures:
                    return Ticket(Outcome.ACCOUNT_LOCKED, None, 0.0, address, account)
            cur.execute(
                "INSERT INTO attempts (address, account, at, running) VALUES (?, ?, ?, 1)",
                (address, account, now),
            )
            attempt = cur.lastrowid
            self._cap(cur)
        return Ticket(Outcome.CHECK, attempt, 0.0, address, account)

    def finish(self, now: float, ticket: Ticket, ok: bool) -> int:
        """The check is done: give the slot back (right password) or count it.

        Returns the address's wrong passwords in its window, for the delay.
        """
        with self._transaction() as cur:
            if ok:
                cur.execute("DELETE FROM attempts WHERE id = ?", (ticket.attempt,))
                cur.execute(
                    "INSERT INTO logins (address, account, at) VALUES (?, ?, ?) "
                    "ON CONFLICT (address, account) DO UPDATE SET at = excluded.at",
                    (ticket.address, ticket.account, now),
                )
            else:
                cur.execute(
                    "UPDATE attempts SET running = 0, at = ? WHERE id = ?", (now, ticket.attempt)
                )
            (count,) = cur.execute(
                "SELECT count(*) FROM attempts WHERE address = ? AND running = 0 AND at >= ?",
                (ticket.address, now - self.limits.failure_window),
            ).fetchone()
        return int(count)

    def blocked(self, now: float, ip: str) -> bool:
        """True when the address has used up its wrong passwords (nothing is reserved)."""
        return self.address_failures(now, ip) >= self.limits.max_failures

    # ---- for tests and operators ------------------------------------------------

    def address_failures(self, now: float, ip: str) -> int:
        with self._lock:
            (count,) = self._db.execute(
                "SELECT count(*) FROM attempts WHERE address = ? AND (running = 1 OR at >= ?)",
                (client_key(ip), now - self.limits.failure_window),
            ).fetchone()
        return int(count)

    def account_failures(self, now: float, name: str) -> int:
        with self._lock:
            (count,) = self._db.execute(
                "SELECT count(*) FROM attempts WHERE account = ? AND (running = 1 OR at >= ?)",
                (account_key(name), now - self.limits.account_window),
            ).fetchone()
        return int(count)

    def rows(self) -> int:
        with self._lock:
            (a,) = self._db.execute("SELECT count(*) FROM attempts").fetchone()
            (b,) = self._db.execute("SELECT count(*) FROM logins").fetchone()
        return int(a) + int(b)


def delay_for(failures: int) -> float:
    """Seconds before answering a wrong password: 0.5 s doubling per failure, up to 8 s."""
    if failures <= 0:
        return 0.0
    return float(min(MAX_DELAY, BASE_DELAY * 2 ** (failures - 1)))


class AuthGuard:
    """What sessions call: :class:`AuthLedger` off the event loop, with waiting for BUSY.

    The database is opened on first use, in the AUTHDB thread. When it cannot
    be used (disk full, permissions), AUTH answers 454 4.7.0: failing open
    would hand a guesser unlimited tries.
    """

    def __init__(
        self,
        path: Path | str,
        limits: Limits | None = None,
        busy_wait: float = BUSY_WAIT,
    ) -> None:
        self.path = Path(path)
        self.limits = limits or Limits()
        self.busy_wait = busy_wait
        self._ledger: AuthLedger | None = None
        self._open_lock = threading.Lock()

    @classmethod
    def in_spool(cls, spool: Path, cfg: AuthConfig) -> AuthGuard:
        return cls(spool / DB_NAME, Limits.from_config(cfg))

    def reconfigure(self, cfg: AuthConfig) -> None:
        """New address limits on reload; the counts so far are kept."""
        current = self.limits
        self.limits = Limits(
            max(1, cfg.max_failures),
            cfg.failure_window,
            current.max_concurrent,
            current.account_max_failures,
            current.account_window,
            current.trust_window,
            current.max_rows,
        )
        if self._ledger is not None:
            self._ledger.limits = self.limits

    def _get(self) -> AuthLedger:
        with self._open_lock:
            if self._ledger is None:
                self._ledger = AuthLedger(self.path, self.limits)
            return self._ledger

    def _begin(self, ip: str, name: str) -> Ticket:
        return self._get().begin(time.time(), ip, name)

    def _finish(self, ticket: Ticket, ok: bool) -> int:
        return self._get().finish(time.time(), ticket, ok)

    async def begin(self, ip: str, name: str) -> Ticket:
        """A ticket; waits (polling, up to ``busy_wait``) while the address is at its cap."""
        deadline = time.monotonic() + self.busy_wait
        pause = 0.05
        while True:
            try:
                ticket = await workers.AUTHDB.run(self._begin, ip, name)
            except sqlite3.Error as exc:
                self._failed(exc)
                return Ticket(Outcome.UNAVAILABLE)
            if ticket.outcome is not Outcome.BUSY or time.monotonic() >= deadline:
                return ticket
            await asyncio.sleep(pause)
            pause = min(0.5, pause * 2)

    async def blocked(self, ip: str) -> bool:
        """Cheap early answer at the AUTH command, before credentials are read.

        :meth:`begin` decides again, atomically; this only spares a blocked
        client the exchange.
        """
        try:
            return bool(await workers.AUTHDB.run(self._blocked, ip))
        except sqlite3.Error as exc:
            self._failed(exc)
            return False

    def _blocked(self, ip: str) -> bool:
        return self._get().blocked(time.time(), ip)

    async def finish(self, ticket: Ticket, ok: bool) -> float:
        """Record the result; the delay to wait before answering a wrong password."""
        try:
            failures = await workers.AUTHDB.run(self._finish, ticket, ok)
        except sqlite3.Error as exc:
            self._failed(exc)
            return 0.0
        return 0.0 if ok else delay_for(failures)

    def abandon(self, ticket: Ticket) -> None:
        """The session went away mid-check: count it as wrong, without waiting."""
        with contextlib.suppress(RuntimeError):
            task = asyncio.get_running_loop().create_task(self.finish(ticket, False))
            _pending.add(task)
            task.add_done_callback(_pending.discard)

    def _failed(self, exc: Exception) -> None:
        event(
            "smtpd",
            f"error: {self.path}: AUTH failure counts unavailable ({exc}); "
            "answering AUTH with 454 4.7.0",
            level=logging.ERROR,
        )


_pending: set[asyncio.Task[float]] = set()

__all__ = [
    "ACCOUNT_MAX_FAILURES",
    "DB_NAME",
    "MAX_CONCURRENT",
    "AuthGuard",
    "AuthLedger",
    "Limits",
    "Outcome",
    "Ticket",
    "delay_for",
]
