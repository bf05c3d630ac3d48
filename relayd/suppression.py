"""The suppression list (SPEC §10): addresses that bounced hard are not written to again.

A recipient that failed permanently, with a 5.1.x status (no such user,
bad domain) or by expiring after ``[delivery] max_age``, is suppressed for
``[suppression] expire`` ("30d"). Mail from submission clients (and the
HTTP API) to a suppressed address gets ``550 5.1.1 <addr>: suppressed after
a hard bounce on DATE`` at RCPT, so an application that keeps writing to a
dead address stops burning the sender's reputation. Inbound relaying and
``[relay] networks`` clients that did not authenticate are not affected:
their mail is not the application's to stop.

The list is a small SQLite database in the spool directory
(``suppression.db``, WAL): every acceptor process (``[server] processes``)
reads the same rows, it survives restarts, and ``relayctl suppression``
edits it with the daemon stopped as well. Every call from the event loop
runs in a dedicated thread. Addresses are compared case-insensitively.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from relayd import sqlitedb, workers
from relayd.config import SuppressionConfig
from relayd.log import event

DB_NAME = "suppression.db"
# The table never grows past this: beyond it the entries closest to expiry go.
MAX_ENTRIES = 1_000_000

POOL = workers.Pool("suppression", workers=1, queue=256)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppressed (
    address TEXT PRIMARY KEY,
    since REAL NOT NULL,
    expires REAL NOT NULL,
    dsn TEXT NOT NULL DEFAULT '',
    reply TEXT NOT NULL DEFAULT '',
    queue_id TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT 'bounce'
);
CREATE INDEX IF NOT EXISTS suppressed_expires ON suppressed (expires);
"""


@dataclass(frozen=True)
class Entry:
    address: str
    since: float
    expires: float
    dsn: str = ""
    reply: str = ""
    queue_id: str = ""
    source: str = "bounce"  # "bounce" (a delivery failed) or "operator" (relayctl)

    def as_json(self) -> dict[str, object]:
        return {
            "address": self.address,
            "since": int(self.since),
            "expires": int(self.expires),
            "dsn": self.dsn,
            "reply": self.reply,
            "queue_id": self.queue_id,
            "source": self.source,
        }


def key(address: str) -> str:
    return address.strip().lower()


def is_hard_bounce(dsn: str, expired: bool) -> bool:
    """Suppress this failure? 5.1.x (bad mailbox or domain) or a message that expired."""
    return expired or dsn.startswith("5.1.")


def when_text(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d")


def refusal(address: str, entry: Entry) -> str:
    """The RCPT reply for a suppressed address, named as the client wrote it."""
    return f"550 5.1.1 <{address}>: suppressed after a hard bounce on {when_text(entry.since)}"


class SuppressionList:
    """The table; every method is one short transaction (any thread, any process)."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlitedb.connect(self.path, _SCHEMA, timeout=5.0, synchronous="FULL")

    @classmethod
    def in_spool(cls, spool: Path) -> SuppressionList:
        return cls(spool / DB_NAME)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Cursor]:
        return sqlitedb.transaction(self._lock, self._db)

    def lookup(self, address: str, now: float) -> Entry | None:
        with self._lock:
            row = self._db.execute(
                "SELECT address, since, expires, dsn, reply, queue_id, source FROM suppressed "
                "WHERE address = ? AND expires > ?",
                (key(address), now),
            ).fetchone()
        return Entry(*row) if row else None

    def add(
        self,
        address: str,
        now: float,
        lifetime: float,
        *,
        dsn: str = "",
        reply: str = "",
        queue_id: str = "",
        source: str = "bounce",
    ) -> bool:
        """Suppress (or suppress again, from now); True if it was not suppressed before."""
        with self._transaction() as cur:
            cur.execute("DELETE FROM suppressed WHERE expires <= ?", (now,))
            known = cur.execute(
                "SELECT 1 FROM suppressed WHERE address = ?", (key(address),)
            ).fetchone()
            cur.execute(
                "INSERT OR REPLACE INTO suppressed "
                "(address, since, expires, dsn, reply, queue_id, source) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key(address), now, now + lifetime, dsn, reply[:500], queue_id, source),
            )
            cur.execute(
                "DELETE FROM suppressed WHERE address IN (SELECT address FROM suppressed "
                "ORDER BY expires DESC LIMIT -1 OFFSET ?)",
                (MAX_ENTRIES,),
            )
        return known is None

    def remove(self, address: str) -> bool:
        with self._transaction() as cur:
            cur.execute("DELETE FROM suppressed WHERE address = ?", (key(address),))
            return cur.rowcount > 0

    def entries(self, now: float) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT address, since, expires, dsn, reply, queue_id, source FROM suppressed "
                "WHERE expires > ? ORDER BY since, address",
                (now,),
            ).fetchall()
        return [Entry(*row) for row in rows]

    def count(self, now: float) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT count(*) FROM suppressed WHERE expires > ?", (now,)
            ).fetchone()
        return int(row[0])


class Suppression:
    """The asynchronous face: the check sessions make at RCPT, the scheduler's additions."""

    def __init__(self, spool: Path, config: SuppressionConfig) -> None:
        self.path = Path(spool) / DB_NAME
        self.config = config
        self._list: SuppressionList | None = None
        self._open_lock = threading.Lock()
        self._warned = 0.0

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def _get(self) -> SuppressionList:
        with self._open_lock:
            if self._list is None:
                self._list = SuppressionList(self.path)
            return self._list

    def close(self) -> None:
        with self._open_lock:
            if self._list is not None:
                self._list.close()
                self._list = None

    async def refusal(self, address: str) -> str | None:
        """The 550 reply for a suppressed address, else None (also when the list is unreadable)."""
        if not self.config.enabled:
            return None
        try:
            entry = await POOL.run(self._lookup, address)
        except sqlite3.Error as exc:
            self._failed(exc)
            return None
        return refusal(address, entry) if entry is not None else None

    def _lookup(self, address: str) -> Entry | None:
        return self._get().lookup(address, time.time())

    async def add(self, address: str, *, dsn: str, reply: str, queue_id: str) -> bool:
        """Suppress after a hard bounce; True if the address is newly suppressed."""
        if not self.config.enabled:
            return False
        try:
            return await POOL.run(self._add, address, dsn, reply, queue_id)
        except sqlite3.Error as exc:
            self._failed(exc)
            return False

    def _add(self, address: str, dsn: str, reply: str, queue_id: str) -> bool:
        return self._get().add(
            address, time.time(), self.config.expire, dsn=dsn, reply=reply, queue_id=queue_id
        )

    async def count(self) -> int:
        try:
            return await POOL.run(lambda: self._get().count(time.time()))
        except sqlite3.Error:
            return 0

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned > 60:
            self._warned = now
            event(
                "suppression",
                f"warning: suppression list {self.path} unusable: {exc}",
                level=logging.WARNING,
            )


def owned_like_spool(path: Path) -> None:
    """Run as root (relayctl): leave the database files to the spool's owner."""
    if os.geteuid() != 0:
        return
    try:
        st = path.parent.stat()
    except OSError:
        return
    for name in (path.name, path.name + "-wal", path.name + "-shm"):
        with contextlib.suppress(OSError):
            os.chown(path.parent / name, st.st_uid, st.st_gid)
