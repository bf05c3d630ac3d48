"""Dedicated, bounded thread pools for the blocking work sessions hand off.

asyncio's default executor is one shared queue: six messages whose DKIM
checks each waited on DNS there once held up every password check behind
them. So each kind of blocking work gets its own small pool, and none can
wait behind another:

- ``VERIFY``: inbound DKIM verification (body hash and signature
  arithmetic; the key lookups themselves are asyncio DNS, not threads);
- ``SPF``: pyspf, which is synchronous and waits on DNS in its thread;
- ``SIGN``: DKIM signing of our own users' mail;
- ``HASH``: password checks (Argon2id, about 80 ms of one core each), which
  relayd.users.UserStore runs here;
- ``AUTHDB``: the shared AUTH failure counts (relayd.policy.authguard), one
  thread holding the SQLite connection.

A pool also bounds its queue: at most ``workers + queue`` jobs are handed
to its threads at once; further callers wait on the event loop, where
waiting costs nothing but a future and where their own deadline can end
the wait. A job counts until its thread has really finished it, even when
its caller gave up, so an abandoned job never lets a new one jump the bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Pool:
    """A ThreadPoolExecutor with a fixed number of threads and a bounded queue."""

    def __init__(self, name: str, workers: int, queue: int) -> None:
        self.name = name
        self.workers = workers
        self.limit = workers + queue
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"relayd-{name}")
        # One semaphore per event loop: tests run several loops in one process.
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    def _semaphore(self, loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
        sem = self._slots.get(loop)
        if sem is None:
            sem = self._slots[loop] = asyncio.Semaphore(self.limit)
        return sem

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in one of this pool's threads, once a slot is free."""
        loop = asyncio.get_running_loop()
        sem = self._semaphore(loop)
        await sem.acquire()
        try:
            job: Future[T] = self._executor.submit(fn, *args)
        except BaseException:
            sem.release()
            raise

        def release(_: Future[T]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(sem.release)

        job.add_done_callback(release)
        return await asyncio.wrap_future(job, loop=loop)


VERIFY = Pool("verify", workers=2, queue=6)
SPF = Pool("spf", workers=8, queue=8)
SIGN = Pool("sign", workers=2, queue=6)
HASH = Pool("hash", workers=2, queue=6)
AUTHDB = Pool("authdb", workers=1, queue=64)

__all__ = ["AUTHDB", "HASH", "SIGN", "SPF", "VERIFY", "Pool"]
