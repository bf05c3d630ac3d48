"""What ``GET /v1/messages/ID`` answers once a message has left the queue (kept 7 days).

While a message is queued its state is the spool's. When the scheduler
removes a message that came in through the API, its final recipient
states are written here (SQLite in the spool directory, one small row per
message, rows older than ``KEEP`` dropped on each write), so an app that
asks later still learns "delivered" or "bounced".
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from relayd import sqlitedb
from relayd.spool.model import Envelope

KEEP = 7 * 86400.0
DB_NAME = "api.db"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS finished (id TEXT PRIMARY KEY, user TEXT, left REAL, view TEXT);
CREATE INDEX IF NOT EXISTS finished_left ON finished (left);
"""
_STATUS = {"pending": "queued", "deferred": "deferred", "sent": "delivered", "failed": "bounced"}


def message_view(env: Envelope) -> dict[str, Any]:
    """SPEC section 10's shape of one message, from its envelope."""
    tries: dict[str, int] = {}
    for attempt in env.history:
        for rcpt in attempt.recipients:
            tries[rcpt] = tries.get(rcpt, 0) + 1
    return {
        "id": env.queue_id,
        "sender": env.sender,
        "arrival_time": int(env.arrival_time),
        "recipients": [
            {
                "address": r.address,
                "status": _STATUS.get(r.status, r.status),
                "dsn": r.dsn,
                "reply": r.reply,
                "attempts": tries.get(r.address, 0),
            }
            for r in env.recipients
        ],
    }


class Ledger:
    """Finished API messages by queue id; opened on first use, used from threads."""

    def __init__(self, spool: Path, clock: Any = time.time) -> None:
        self.path = Path(spool) / DB_NAME
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlitedb.connect(str(self.path), _SCHEMA, timeout=5.0, synchronous="NORMAL")
        return self._db

    def record(self, env: Envelope) -> None:
        """The message left the queue: keep its final view (blocking: call from a thread)."""
        now = self._clock()
        with self._lock:
            db = self._conn()
        with sqlitedb.transaction(self._lock, db) as cur:
            cur.execute("DELETE FROM finished WHERE left < ?", (now - KEEP,))
            cur.execute(
                "INSERT OR REPLACE INTO finished VALUES (?, ?, ?, ?)",
                (env.queue_id, env.sasl_username, now, json.dumps(message_view(env))),
            )

    def lookup(self, queue_id: str) -> tuple[str, dict[str, Any]] | None:
        """(user, view) of a finished message within the last 7 days."""
        if not self.path.exists():
            return None
        with self._lock:
            row = (
                self._conn()
                .execute(
                    "SELECT user, view FROM finished WHERE id = ? AND left >= ?",
                    (queue_id, self._clock() - KEEP),
                )
                .fetchone()
            )
        if row is None:
            return None
        view: dict[str, Any] = json.loads(row[1])
        return str(row[0]), view

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
