"""Threads for the spool's blocking calls, with the leanest hand-off to and from the loop.

Every accepted message crosses to a thread and back twice (its file
write and fdatasync, then the batch's link and directory fsync), and the
Python a thread runs to take and settle a job needs the GIL, which the
busy event loop holds. ``loop.run_in_executor`` spends that Python on a
concurrent.futures Future (a lock and a condition), a work item, a
semaphore and a chain of callbacks; here a job is a tuple on a
``SimpleQueue`` and its outcome one ``call_soon_threadsafe``.

Semantics are run_in_executor's: the call runs even if its awaiter is
cancelled (the spool relies on that: a commit in flight is finished and
then undone, never half done), and its exception reaches the awaiter; the
threads end once their owner is garbage-collected, as a
ThreadPoolExecutor's do. relayd.workers.Pool stays the pool for work that
sessions hand off under hostile load (its queue is bounded); the spool's
jobs are bounded already by the sessions and the scheduler that wait on
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]


class Workers:
    """Up to ``size`` threads, started as jobs need them, kept until ``shutdown``.

    Jobs in flight are counted on the loop's side only (at submit and when
    the outcome is settled there), so no lock is taken on either side.
    """

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._in_flight = 0  # changed on the submitting loop only
        # The threads hold only the queue and a weak reference: when nobody
        # holds this object any more, they are told to end.
        self._stop = weakref.finalize(self, _stop_threads, self._jobs, self._threads)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` in a worker; the future settles on the caller's loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._in_flight += 1
        if self._in_flight > len(self._threads) and len(self._threads) < self._size:
            self._start_thread()
        self._jobs.put((loop, future, fn, args))
        return future

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
