"""Connection counts and rate limits shared by every relayd process (relayd.policy.shared_counts).

The behaviours common with one process's own counts are tested in
test_ratelimit.py for both; here is what only sharing has: several
processes counting into one segment, a dead process's connections being
forgotten, the lock, and a flood that cannot grow the segment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

from relayd.config import Rate, RateLimits
from relayd.policy.shared_counts import (
    SharedConnectionCounter,
    SharedCounts,
    SharedRateLimiter,
)
from relayd.policy.verdict import Refuse

T0 = 1000.0


def counters(
    shared: SharedCounts, columns: int, total: int, per_ip: int
) -> list[SharedConnectionCounter]:
    return [SharedConnectionCounter(shared, c, total, per_ip) for c in range(columns)]


def test_limits_hold_across_processes() -> None:
    shared = SharedCounts.create(100)
    shared.alone = False
    a, b = counters(shared, 2, total=5, per_ip=3)
    assert a.acquire("192.0.2.1") is None
    assert b.acquire("192.0.2.1") is None
    assert a.acquire("192.0.2.1") is None
    refused = b.acquire("192.0.2.1")
    assert isinstance(refused, Refuse) and refused.code == 421
    assert "too many connections from 192.0.2.1" in refused.text
    assert b.acquire("192.0.2.2") is None and a.acquire("192.0.2.3") is None
    assert a.total == b.total == 5
    full = a.acquire("192.0.2.4")
    assert isinstance(full, Refuse) and full.text == "too many connections, try again later"
    b.release("192.0.2.1")
    assert a.acquire("192.0.2.4") is None
    assert a.count("192.0.2.1") == b.count("192.0.2.1") == 2


def test_a_process_releases_only_what_it_acquired() -> None:
    shared = SharedCounts.create(100)
    a, b = counters(shared, 2, total=10, per_ip=10)
    assert a.acquire("192.0.2.1") is None
    b.release("192.0.2.1")  # b never counted this client: nothing changes
    assert a.count("192.0.2.1") == 1 and a.total == 1
    a.release("192.0.2.1")
    a.release("192.0.2.1")  # twice: never negative
    assert a.count("192.0.2.1") == 0 and a.total == 0 and a.tracked() == 0


def test_a_dead_process_connections_are_forgotten() -> None:
    """A real second process counts three connections and dies without releasing them."""
    shared = SharedCounts.create(100)
    shared.alone = False
    child = textwrap.dedent(
        f"""
        import os, sys
        from relayd.policy.shared_counts import SharedConnectionCounter, SharedCounts
        shared = SharedCounts.inherited({shared.fd})
        counter = SharedConnectionCounter(shared, 7, 100, 4)
        for _ in range(3):
            assert counter.acquire("2001:db8::1") is None
        os._exit(9)  # killed: no release
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", child], pass_fds=[shared.fd], timeout=30, check=False
    )
    assert run.returncode == 9
    (mine,) = counters(shared, 1, total=100, per_ip=4)
    assert mine.count("2001:db8::2") == 3  # the same /64
    assert mine.total == 3
    assert mine.acquire("2001:db8::3") is None
    assert mine.acquire("2001:db8::4") is not None  # 4 per /64, across both processes
    shared.forget_column(7)
    assert mine.count("2001:db8::1") == 1 and mine.total == 1


def test_the_lock_keeps_other_processes_out() -> None:
    """While one process holds the lock, another's acquire waits for it."""
    shared = SharedCounts.create(100)
    shared.alone = False
    child = textwrap.dedent(
        f"""
        import time
        from relayd.policy.shared_counts import SharedConnectionCounter, SharedCounts
        counter = SharedConnectionCounter(SharedCounts.inherited({shared.fd}), 1, 100, 100)
        start = time.monotonic()
        assert counter.acquire("192.0.2.1") is None
        print(time.monotonic() - start)
        """
    )
    with shared.locked():
        proc = subprocess.Popen(
            [sys.executable, "-c", child], pass_fds=[shared.fd], stdout=subprocess.PIPE
        )
        time.sleep(1.0)  # the child starts and blocks on the lock
        assert proc.poll() is None
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert float(out) > 0.3  # it waited for the lock (interpreter start-up is well under 1 s)
    (mine,) = counters(shared, 1, total=100, per_ip=100)
    assert mine.count("192.0.2.1") == 1


def test_rate_limits_count_across_processes() -> None:
    shared = SharedCounts.create(16)
    limits = RateLimits(per_ip=Rate(3, 60.0), per_user=Rate(2, 60.0))
    a, b = SharedRateLimiter(limits, shared), SharedRateLimiter(limits, shared)
    assert a.check(T0, "192.0.2.1") is None
    assert b.check(T0 + 1, "192.0.2.1") is None
    assert a.check(T0 + 2, "192.0.2.1") is None
    refused = b.check(T0 + 3, "192.0.2.1")
    assert isinstance(refused, Refuse) and (refused.code, refused.enhanced) == (450, "4.7.1")
    assert a.check(T0, "192.0.2.9", user="Alice") is None
    assert b.check(T0, "192.0.2.8", user="alice") is None
    assert a.check(T0, "192.0.2.7", user="ALICE") is not None


def test_a_flood_of_keys_cannot_grow_the_segment_nor_free_a_busy_key() -> None:
    shared = SharedCounts.create(16, max_rate_keys=1024)
    size = os.fstat(shared.fd).st_size
    limiter = SharedRateLimiter(RateLimits(per_ip=Rate(3, 3600.0)), shared)
    for _ in range(3):
        assert limiter.check(T0, "192.0.2.1") is None
    for i in range(20_000):
        now = T0 + i * 0.01
        limiter.check(now, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
        if i % 100 == 0:
            assert limiter.check(now, "192.0.2.1") is not None, i  # refused, and kept fresh
    assert os.fstat(shared.fd).st_size == size
    assert limiter.tracked() <= 1024 + 8


def test_an_acceptor_cannot_open_something_else() -> None:
    fd = os.memfd_create("not-counts")
    os.ftruncate(fd, 1 << 16)
    try:
        SharedCounts.inherited(fd)
    except ValueError as exc:
        assert "not a relayd shared counts segment" in str(exc)
    else:
        raise AssertionError("a foreign segment was accepted")
    finally:
        os.close(fd)


def test_max_connections_distinct_clients_all_fit() -> None:
    """Slots are never what refuses a client while the total is under the maximum."""
    for maximum in (1000, 2048, 5000):
        shared = SharedCounts.create(maximum)
        (counter,) = counters(shared, 1, total=maximum, per_ip=1)
        refused = [
            i for i in range(maximum) if counter.acquire(f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}")
        ]
        assert refused == [], (maximum, len(refused))
        assert counter.total == maximum
        assert counter.acquire("192.0.2.1") is not None  # the maximum itself still holds
