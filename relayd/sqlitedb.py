"""The SQLite habits relayd's small databases share (auth counts, suppression, webhook outbox).

One connection per process, used from worker threads under a lock; WAL so
readers in other processes never wait for a writer; a busy timeout because
the daemon and its acceptor processes share the files; every change one
``BEGIN IMMEDIATE`` transaction, so a check and its write are atomic across
processes.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator


def connect(path: str, schema: str, *, timeout: float, synchronous: str) -> sqlite3.Connection:
    """An autocommit connection with relayd's pragmas, the schema created."""
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    if path != ":memory:":
        db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {synchronous}")
    db.executescript(schema)
    return db


@contextlib.contextmanager
def transaction(lock: threading.Lock, db: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
    """One ``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error."""
    with lock:
        cur = db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")
