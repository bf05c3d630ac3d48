"""The dedicated pools: a fixed number of threads, a bounded queue, no shared waiting line."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from relayd import workers
from relayd.workers import Pool


def test_queue_is_bounded_and_a_slot_frees_only_when_the_thread_is_done() -> None:
    pool = Pool("test", workers=1, queue=1)
    release = threading.Event()
    started: list[int] = []

    def job(n: int) -> int:
        started.append(n)
        assert release.wait(10)
        return n

    async def run() -> None:
        first = asyncio.ensure_future(pool.run(job, 1))
        second = asyncio.ensure_future(pool.run(job, 2))
        await asyncio.sleep(0.2)
        # Both slots taken: a third caller waits on the event loop, and its
        # own deadline ends the wait.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await pool.run(job, 3)
        # The first caller gives up; its thread still runs, so the slot stays taken.
        first.cancel()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await pool.run(job, 4)
        release.set()
        assert await second == 2
        assert await asyncio.wait_for(pool.run(job, 5), 5) == 5

    asyncio.run(run())
    assert started == [1, 2, 5]


def test_pools_are_separate() -> None:
    """A verification pool full of stuck jobs does not delay signing."""
    release = threading.Event()

    def stuck() -> None:
        assert release.wait(10)

    async def run() -> float:
        jobs = [asyncio.ensure_future(workers.VERIFY.run(stuck)) for _ in range(20)]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await asyncio.wait_for(workers.SIGN.run(time.sleep, 0), 5)
        elapsed = time.monotonic() - started
        release.set()
        await asyncio.wait_for(asyncio.gather(*jobs), 10)
        return elapsed

    assert asyncio.run(run()) < 0.5
