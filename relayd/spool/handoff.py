"""Threads for the spool's blocking calls, with the leanest hand-off to and from the loop.

Every accepted message crosses to a thread and back once (its file
write and fdatasync there, then its batch's directory fsync, after which
the group committer tells the loop), and the Python a thread runs to
take and settle a job needs the GIL, which the busy event loop holds.
``loop.run_in_executor`` spends that Python on a concurrent.futures
Future (a lock and a condition), a work item, a semaphore and a chain of
callbacks; here a job is a tuple on a ``SimpleQueue`` and its outcome
one ``call_soon_threadsafe``, or none at all for a posted job (``post``),
whose function reports by itself.

Semantics are run_in_executor's: the call runs even if its awaiter is
cancelled (the spool relies on that: a commit in flight is finished and
then undone, never half done), and its exception reaches the awaiter (a
posted job has none: its function must report, and what escapes it is
logged); the
threads end once their owner is garbage-collected, as a
ThreadPoolExecutor's do. relayd.workers.Pool stays the pool for work that
sessions hand off under hostile load (its queue is bounded); the spool's
jobs are bounded already by the sessions and the scheduler that wait on
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("relayd.qmgr")

# (loop, future, fn, args); loop and future None for a posted job, which reports to nobody.
_Loop = asyncio.AbstractEventLoop
_Job = tuple[_Loop | None, asyncio.Future[Any] | None, Callable[..., Any], tuple[Any, ...]]


class Workers:
    """Up to ``size`` threads, started as jobs need them, kept until ``shutdown``.

    Jobs in flight are counted on the loop's side only (at submit and when
    the outcome is settled there), without a lock; posted jobs end in
    their thread, so they are counted apart, under a lock both sides take.
    """

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._in_flight = 0  # changed on the submitting loop only
        self._posted = 0  # jobs that report to nobody, queued or running
        self._posted_lock = threading.Lock()  # taken by the loop and the threads for them
        # The threads hold only the queue and a weak reference: when nobody
        # holds this object any more, they are told to end.
        self._stop = weakref.finalize(self, _stop_threads, self._jobs, self._threads)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` in a worker; the future settles on the caller's loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._in_flight += 1
        if self._in_flight + self._posted > len(self._threads) and len(self._threads) < self._size:
            self._start_thread()
        self._jobs.put((loop, future, fn, args))
        return future

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in a worker and hear nothing back: ``fn`` says what it must itself.

        For the spool's commits, whose outcome reaches the loop through the
        group committer: a second report from the thread would cost the
        loop a wake-up per message for nothing.
        """
        with self._posted_lock:
            self._posted += 1
        try:
            busy = self._in_flight + self._posted
            if busy > len(self._threads) and len(self._threads) < self._size:
                self._start_thread()
        except BaseException:
            self.posted_done()
            raise
        self._jobs.put((None, None, fn, args))

    def posted_done(self) -> None:
        """In a worker: a posted job has ended."""
        with self._posted_lock:
            self._posted -= 1

    def done(self, future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        """On the loop: one job fewer in flight, and its outcome to the awaiter."""
        self._in_flight -= 1
        _settle(future, result, error)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.submit(fn, *args)

    def shutdown(self) -> None:
        """Let every thread finish its job and end (without waiting for them)."""
        self._stop()

    def _start_thread(self) -> None:
        name = f"{self._name}_{len(self._threads)}"
        thread = threading.Thread(
            target=_work, args=(self._jobs, weakref.ref(self)), name=name, daemon=True
        )
        self._threads.append(thread)
        thread.start()


def _work(jobs: queue.SimpleQueue[_Job | None], owner: weakref.ref[Workers]) -> None:
    while (job := jobs.get()) is not None:
        _run_one(job, owner)
        del job  # hold nothing of the last job while waiting for the next


def _run_one(job: _Job, owner: weakref.ref[Workers]) -> None:
    loop, future, fn, args = job
    if future is None:
        _run_posted(fn, args, owner)
        return
    assert loop is not None
    error: BaseException | None = None
    result: Any = None
    try:
        result = fn(*args)
    except BaseException as exc:  # handed to the awaiter, as run_in_executor does
        error = exc
    workers = owner()
    settle = workers.done if workers is not None else _settle
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
        loop.call_soon_threadsafe(settle, future, result, error)


def _run_posted(fn: Callable[..., Any], args: tuple[Any, ...], owner: weakref.ref[Workers]) -> None:
    try:
        fn(*args)
    except Exception:  # nobody to hand it to: a posted job reports its own outcome
        log.exception("a posted job failed")
    finally:
        workers = owner()
        if workers is not None:
            workers.posted_done()


def _stop_threads(jobs: queue.SimpleQueue[_Job | None], threads: list[threading.Thread]) -> None:
    for _ in threads:
        jobs.put(None)
    threads.clear()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiter was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
