"""The spool's group committer: directory changes applied in batches, one fsync per directory.

A queue file is durable once its data is synced and then its directory;
the directory fsync is what concurrent commits share. The committer is
one thread with a queue of its own: a writer thread that has synced a
new file hands it the directory change directly and waits, and whatever
arrives while one batch's fsync runs forms the next batch.

Why a thread and not a task on the event loop: between two batches a
task needed the busy loop twice (to learn that the batch was done, and
to hand over the next one), and every commit crossed between the loop
and a thread twice. Here a batch follows the previous one as soon as its
fsync returns, and the loop hears once per message, when its commit is
durable. Measured with 20 clients on a 2-core machine, the commit's
median wait went from 27 to about 23 ms (the file's write and sync about
5, the batch about 4); the rest is the trip to a writer thread and back,
each side waiting for the interpreter lock while the loop is busy.
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
    """One thread applying queued Ops in batches; started with the first Op, ended by ``close``."""

    batch_size = 0  # ops at most in one batch (0: no limit; 1: one fsync per op)

    def __init__(self, name: str = "relayd-spool-commit") -> None:
        self._name = name
        self._ops: queue.SimpleQueue[Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.batches = 0
        self.dir_syncs = 0

    def submit(self, op: Op) -> None:
        """Queue ``op``; its ``done`` is called (in the committer thread) once it is settled."""
        if self._thread is None:
            self._start()
        self._ops.put(op)

    def wait(self, op: Op) -> bool:
        """From a thread that may block: queue ``op`` and return once it is durable (or raise)."""
        settled = threading.Event()
        op.done = settled.set
        self.submit(op)
        settled.wait()
        return op.outcome()

    def close(self) -> None:
        """End the thread once every op queued before is settled (without waiting for it)."""
        with self._start_lock:
            if self._thread is not None:
                self._ops.put(None)
                self._thread = None

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=_commit_batches, args=(self, self._ops), name=self._name, daemon=True
                )
                self._thread.start()


def _commit_batches(committer: GroupCommitter, ops: queue.SimpleQueue[Op | None]) -> None:
    while (first := ops.get()) is not None:
        batch, last = _take_batch(first, ops, committer.batch_size)
        try:
            committer.dir_syncs += run_batch(batch)
        except BaseException as crash:  # never leave a waiter hanging
            for op in batch:
                op.error = op.error or crash
        committer.batches += 1
        for op in batch:
            op.done()
        del batch, first
        if last:
            return


def _take_batch(first: Op, ops: queue.SimpleQueue[Op | None], limit: int) -> tuple[list[Op], bool]:
    """``first`` and whatever else is queued already; True when the stop sign came with it."""
    batch = [first]
    while not limit or len(batch) < limit:
        try:
            op = ops.get_nowait()
        except queue.Empty:
            break
        if op is None:
            return batch, True
        batch.append(op)
    return batch, False
