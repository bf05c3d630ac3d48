"""The spool's worker threads: results, errors and cancellation as run_in_executor gives them."""

from __future__ import annotations

import asyncio
import threading

import pytest

from relayd.spool.handoff import Workers


def test_results_and_errors_reach_the_awaiter_from_a_bounded_number_of_threads() -> None:
    workers = Workers(3, "test")
    seen: set[str] = set()
    gate = threading.Event()

    def job(i: int) -> int:
        seen.add(threading.current_thread().name)
        gate.wait(5)
        return i * 2

    def fail() -> None:
        raise OSError(5, "Input/output error")

    async def scenario() -> list[int]:
        jobs = [asyncio.ensure_future(workers.run(job, i)) for i in range(10)]
        await asyncio.sleep(0.1)
        gate.set()
        with pytest.raises(OSError, match="Input/output"):
            await workers.run(fail)
        return list(await asyncio.gather(*jobs))

    try:
        assert asyncio.run(asyncio.wait_for(scenario(), 10)) == [i * 2 for i in range(10)]
    finally:
        workers.shutdown()
    assert 1 <= len(seen) <= 3


def test_a_cancelled_awaiter_does_not_stop_the_job() -> None:
    workers = Workers(1, "test")
    started, finish, finished = threading.Event(), threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        finish.wait(5)
        finished.set()

    async def scenario() -> None:
        task = asyncio.ensure_future(workers.run(job))
        await asyncio.to_thread(started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        finish.set()
        # The next job runs after it on the one thread: the first one did finish.
        await workers.run(lambda: None)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 10))
    finally:
        workers.shutdown()
    assert finished.is_set()


def test_the_threads_end_once_nobody_holds_the_workers() -> None:
    import gc

    workers = Workers(2, "handoff-gc")

    async def one(pool: Workers) -> None:
        await pool.run(lambda: None)

    asyncio.run(one(workers))
    threads = [t for t in threading.enumerate() if t.name.startswith("handoff-gc")]
    assert threads
    del workers
    gc.collect()
    for thread in threads:
        thread.join(5)
    assert not any(t.is_alive() for t in threads)


def test_posted_jobs_run_on_threads_that_busy_jobs_do_not_block(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A posted job reports to nobody, but it counts: a blocked one gets a new thread
    beside it, and one that raises is logged rather than lost or killing its thread."""
    workers = Workers(3, "post")
    blocked, release, ran = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        blocked.set()
        release.wait(5)

    def boom() -> None:
        raise RuntimeError("posted bug")

    async def scenario() -> None:
        workers.post(hold)
        await asyncio.to_thread(blocked.wait, 5)
        workers.post(boom)
        workers.post(ran.set)
        assert await asyncio.to_thread(ran.wait, 5)  # not stuck behind the held job
        release.set()
        assert await workers.run(lambda: 7) == 7

    try:
        asyncio.run(asyncio.wait_for(scenario(), 10))
    finally:
        workers.shutdown()
    assert "a posted job failed" in caplog.text
