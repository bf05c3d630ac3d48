"""The webhook outbox: events on disk until their receiver has taken them.

A small SQLite database in the spool directory (``events.db``, WAL,
``synchronous = FULL``: a commit is on disk when it returns). An event is
written here, one row per receiving ``[[webhook]]``, *before* anything
tries to send it and before the queue state that produced it is written,
so a restart or a SIGKILL at any point loses none: at worst one is sent
twice. Acceptor processes (``[server] processes``) write their ``queued``
events into the same file; the daemon alone sends.

Bounded: at most ``MAX_EVENTS`` rows. When a new event would go beyond
that (a receiver down for days while mail flows), the oldest rows are
dropped, each counted and logged: the outbox never fills the spool's disk
and never holds up mail.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from relayd import sqlitedb

DB_NAME = "events.db"
MAX_EVENTS = 100_000
# A row handed to a sender is not picked again for this long (longer than any
# send's timeout); if the daemon dies meanwhile, the next start sends it then.
CLAIM_SECONDS = 120.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    url TEXT NOT NULL,
    event TEXT NOT NULL,
    body BLOB NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    claimed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_try);
"""


@dataclass(frozen=True)
class Pending:
    id: int
    url: str
    event: str
    body: bytes
    created: float
    attempts: int


class Outbox:
    """The table; every method is one short transaction, safe from any thread or process."""

    def __init__(self, path: Path | str, max_events: int = MAX_EVENTS) -> None:
        self.path = str(path)
        self.max_events = max_events
        self._lock = threading.Lock()
        self._db = sqlitedb.connect(self.path, _SCHEMA, timeout=10.0, synchronous="FULL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Cursor]:
        return sqlitedb.transaction(self._lock, self._db)

    def put(self, rows: Iterable[tuple[str, str, bytes]], now: float) -> int:
        """Store (url, event, body) rows, due now; returns how many old rows the bound dropped."""
        with self._transaction() as cur:
            cur.executemany(
                "INSERT INTO outbox (url, event, body, created, next_try) VALUES (?, ?, ?, ?, ?)",
                [(url, kind, body, now, now) for url, kind, body in rows],
            )
            # Cheap first look: ids span fewer than the bound, so rows do too.
            low, high = cur.execute("SELECT min(id), max(id) FROM outbox").fetchone()
            if high - low < self.max_events:
                return 0
            (count,) = cur.execute("SELECT count(*) FROM outbox").fetchone()
            if count <= self.max_events:
                return 0
            cur.execute(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)",
                (count - self.max_events,),
            )
            return max(0, cur.rowcount)

    def claim(self, now: float, limit: int) -> list[Pending]:
        """Due rows, oldest first, kept from being claimed again for CLAIM_SECONDS."""
        with self._transaction() as cur:
            rows = cur.execute(
                "SELECT id, url, event, body, created, attempts FROM outbox "
                "WHERE next_try <= ? ORDER BY next_try, id LIMIT ?",
                (now, limit),
            ).fetchall()
            cur.executemany(
                "UPDATE outbox SET next_try = ?, claimed = 1 WHERE id = ?",
                [(now + CLAIM_SECONDS, row[0]) for row in rows],
            )
        return [Pending(r[0], r[1], r[2], bytes(r[3]), r[4], r[5]) for r in rows]

    def release_claims(self, now: float) -> None:
        """At start: nothing is being sent, so what an earlier run claimed is due now."""
        with self._transaction() as cur:
            cur.execute("UPDATE outbox SET next_try = ?, claimed = 0 WHERE claimed = 1", (now,))

    def done(self, row_id: int) -> None:
        with self._transaction() as cur:
            cur.execute("DELETE FROM outbox WHERE id = ?", (row_id,))

    def retry(self, row_id: int, next_try: float, error: str) -> None:
        with self._transaction() as cur:
            cur.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_try = ?, last_error = ?, "
                "claimed = 0 WHERE id = ?",
                (next_try, error[:500], row_id),
            )

    def next_due(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT min(next_try) FROM outbox").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def count(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT count(*) FROM outbox").fetchone()
        return int(row[0])
