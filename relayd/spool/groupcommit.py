"""The spool's group committer: directory changes applied in batches, one fsync per directory.

A queue file is durable once its data is synced and then its directory;
the directory fsync is what concurrent commits share. Whoever finds no
batch under way leads: it applies what is queued, fsyncs each directory
once, settles those ops, and goes on while more arrived meanwhile, so
whatever arrives during one fsync forms the next batch.

A spool writer thread that has synced a new file joins (``join``): it
leads if nobody does, else leaves its op to the leader and is free at
once. Each op's ``done`` tells the event loop, so a commit crosses from
the loop to a thread and back once, whichever thread ran its batch. The
loop itself never blocks: its ops (``submit``) wake the committer thread
when nobody leads.

Why not always the committer thread: a writer that handed its op over
and waited for it cost two more trips through the interpreter lock per
message (the committer waking up, then the writer), each waiting while
the busy loop held the lock. Measured with 20 clients on a 2-core
machine (docs/performance.md), the spool threads' CPU per message went
from 0.10-0.12 to 0.06-0.08 ms of user time; the rate did not move
beyond the spread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("relayd.qmgr")


def sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(eq=False)
class Op:
    """One directory change for the group committer, with what to do if it fails."""

    apply: Callable[[], bool]  # False: nothing was there to change
    dirs: tuple[str, ...]  # directories whose fsync makes ``apply`` durable
    on_fail: Callable[[], None] | None = None  # after ``apply`` raised
    undo: Callable[[], None] | None = None  # after a directory fsync failed
    changed: bool = False
    error: BaseException | None = None
    done: Callable[[], None] = field(default=lambda: None, repr=False)  # called once settled

    def outcome(self) -> bool:
        """``changed`` once durable, else the error (in the caller's thread)."""
        if self.error is not None:
            raise self.error
        return self.changed


def run_batch(ops: Sequence[Op]) -> int:
    """Apply every op, fsync each directory touched once; returns the fsync count.

    One op's failure touches only that op; a failed directory fsync fails (and
    undoes) every op that depended on that directory.
    """
    for op in ops:
        try:
            op.changed = op.apply()
        except OSError as e:
            op.error = e
            if op.on_fail:
                op.on_fail()
    dirs = sorted({d for op in ops if op.changed and op.error is None for d in op.dirs})
    for d in dirs:
        try:
            sync_dir(d)
        except OSError as e:
            _fail_dir(ops, d, e)
    return len(dirs)


def _fail_dir(ops: Sequence[Op], d: str, error: OSError) -> None:
    log.error("spool: fsync of %s failed: %s", d, error)
    for op in ops:
        if op.changed and op.error is None and d in op.dirs:
            op.error = error
            if op.undo:
                op.undo()
    with contextlib.suppress(OSError):  # make the undo durable if the disk lets us
        sync_dir(d)


class GroupCommitter:
    """Batches of queued Ops, led by a joining thread or by its own (started on demand)."""

    batch_size = 0  # ops at most in one batch (0: no limit; 1: one fsync per op)

    def __init__(self, name: str = "relayd-spool-commit") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._pending: list[Op] = []
        self._leading = False  # a thread is applying batches; it takes what is queued
        self._wake: queue.SimpleQueue[bool] = queue.SimpleQueue()  # False: the thread ends
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.dir_syncs = 0

    def join(self, op: Op) -> None:
        """From a thread that may block: queue ``op``, and lead the batches if nobody does.

        Returns once this thread is not needed: at once when another leads,
        else when nothing is left to commit. ``op.done`` says when it is durable.
        """
        if self._queue(op):
            self._lead()

    def submit(self, op: Op) -> None:
        """From the event loop (never blocks): queue ``op``; its own thread leads if need be.

        After ``close`` a new thread is started for it (Spool.close closes
        last, once nothing more is submitted).
        """
        with self._lock:
            self._pending.append(op)
            if self._leading:
                return
            if self._thread is None:
                thread = threading.Thread(
                    target=_serve, args=(self, self._wake), name=self._name, daemon=True
                )
                thread.start()  # raises before leadership is taken: nobody waits in vain
                self._thread = thread
            self._leading = True
            self._wake.put(True)

    def close(self) -> None:
        """End the committer thread once it has led what it was woken for (without waiting)."""
        with self._lock:
            if self._thread is not None:
                self._wake.put(False)
                self._thread = None

    def _queue(self, op: Op) -> bool:
        """Add ``op``; True when the caller must lead (nobody else does)."""
        with self._lock:
            self._pending.append(op)
            if self._leading:
                return False
            self._leading = True
            return True

    def _take(self) -> list[Op]:
        """The next batch; empty (and leadership given up) when nothing is queued."""
        with self._lock:
            limit = self.batch_size or len(self._pending)
            batch, self._pending = self._pending[:limit], self._pending[limit:]
            if not batch:
                self._leading = False
            return batch

    def _lead(self) -> None:
        batch: list[Op] = []
        try:
            while batch := self._take():
                try:
                    self.dir_syncs += run_batch(batch)
                except BaseException as crash:  # never leave a waiter hanging
                    _crashed(batch, crash)
                self.batches += 1
                for op in batch:
                    _settled(op)
                batch = []
        finally:
            if batch:  # left in the middle (the interpreter stopping): let the next one lead
                with self._lock:
                    self._leading = False


def _crashed(batch: Sequence[Op], crash: BaseException) -> None:
    """A bug, not the disk: fail every op of the batch, undoing what was applied."""
    log.error("spool: group commit failed: %r", crash)
    for op in batch:
        if op.error is None:
            op.error = crash
            if op.changed and op.undo:
                with contextlib.suppress(Exception):
                    op.undo()


def _settled(op: Op) -> None:
    try:
        op.done()
    except Exception:  # one waiter's trouble must not stop the batches
        log.exception("spool: telling a commit's waiter failed")


def _serve(committer: GroupCommitter, wake: queue.SimpleQueue[bool]) -> None:
    while wake.get():
        committer._lead()
