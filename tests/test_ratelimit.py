"""Rate limits and connection counts, driven by a fake clock."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.config import Limits, Rate, RateLimits
from relayd.policy.ratelimit import (
    ConnectionCounter,
    RateLimiter,
    client_key,
    rate_text,
)
from relayd.policy.shared_counts import SharedConnectionCounter, SharedCounts, SharedRateLimiter
from relayd.policy.verdict import Refuse

HOUR = 3600.0
T0 = 1000.0

# Every behaviour holds alike for one process's own counts and for the
# counts shared by all processes (relayd.policy.shared_counts).
KINDS = pytest.mark.parametrize("kind", ["own", "shared"])


def new_limiter(kind: str, limits: RateLimits) -> RateLimiter:
    if kind == "own":
        return RateLimiter(limits)
    return SharedRateLimiter(limits, SharedCounts.create(16))


def new_counter(kind: str, limits: Limits) -> ConnectionCounter | SharedConnectionCounter:
    if kind == "own":
        return ConnectionCounter.from_config(limits)
    shared = SharedCounts.create(limits.max_connections)
    return SharedConnectionCounter(shared, 0, limits.max_connections, limits.max_connections_per_ip)


def refused_wait(verdict: Refuse | None) -> int:
    """The N of "try again in Ns", checking the reply shape on the way."""
    assert isinstance(verdict, Refuse)
    assert (verdict.code, verdict.enhanced) == (450, "4.7.1")
    match = re.search(r"try again in (\d+)s", verdict.text)
    assert match, verdict.text
    return int(match.group(1))


def fill(limiter: RateLimiter, count: int, **who: str) -> None:
    ip = who.pop("ip", "192.0.2.1")
    for i in range(count):
        assert limiter.check(T0 + i * 0.001, ip, **who) is None, i


@KINDS
@pytest.mark.parametrize(
    ("limit", "who", "other"),
    [
        ("per_ip", {"ip": "192.0.2.1"}, {"ip": "192.0.2.2"}),
        ("per_user", {"user": "alice"}, {"user": "bob"}),
        ("per_sender_domain", {"sender_domain": "example.test"}, {"sender_domain": "x.test"}),
    ],
)
def test_each_limit_is_hit_then_freed(
    kind: str, limit: str, who: dict[str, str], other: dict[str, str]
) -> None:
    limiter = new_limiter(kind, RateLimits(**{limit: Rate(10, HOUR, "10/hour")}))
    fill(limiter, 10, **who)
    now = T0 + 1.0
    args = {"ip": "192.0.2.1", **who}
    verdict = limiter.check(now, **args)
    wait = refused_wait(verdict)
    assert isinstance(verdict, Refuse)
    assert limit.replace("_", " ") in verdict.text and "10/hour" in verdict.text
    assert 0 < wait <= 2 * HOUR
    # someone else is not affected
    assert limiter.check(now, **{"ip": "192.0.2.3", **other}) is None
    # still refused just before the announced time, accepted at it
    assert limiter.check(now + wait - 2, **args) is not None
    assert limiter.check(now + wait, **args) is None
    # after two quiet windows the whole allowance is back
    later = now + wait + 2 * HOUR
    for i in range(10):
        assert limiter.check(later + i, **args) is None
    assert limiter.check(later + 10, **args) is not None


@KINDS
def test_steady_traffic_is_held_near_the_limit(kind: str) -> None:
    """Over many windows no more than the limit (plus the model's slack) gets through."""
    limiter = new_limiter(kind, RateLimits(per_ip=Rate(60, 60.0)))
    accepted = [t for t in range(0, 6000) if limiter.check(T0 + t * 0.1, "192.0.2.1") is None]
    per_window = len(accepted) / (600 / 60)
    assert 50 <= per_window <= 66


@KINDS
def test_refused_messages_are_not_counted(kind: str) -> None:
    limiter = new_limiter(kind, RateLimits(per_ip=Rate(2, 60.0)))
    fill(limiter, 2)
    first = refused_wait(limiter.check(T0 + 1, "192.0.2.1"))
    for i in range(50):
        limiter.check(T0 + 1 + i * 0.01, "192.0.2.1")
    assert refused_wait(limiter.check(T0 + 1, "192.0.2.1")) == first


def test_the_longest_wait_is_reported() -> None:
    limits = RateLimits(per_ip=Rate(100, 60.0), per_user=Rate(1, 86400.0, "1/day"))
    limiter = RateLimiter(limits)
    assert limiter.check(T0, "192.0.2.1", user="alice") is None
    verdict = limiter.check(T0 + 1, "192.0.2.1", user="alice")
    assert isinstance(verdict, Refuse) and "per user" in verdict.text
    assert refused_wait(verdict) > 86000


@KINDS
def test_a_refusal_records_nothing_anywhere(kind: str) -> None:
    limiter = new_limiter(kind, RateLimits(per_ip=Rate(5, 60.0), per_user=Rate(1, 60.0)))
    assert limiter.check(T0, "192.0.2.1", user="alice") is None
    for _ in range(10):
        assert limiter.check(T0, "192.0.2.1", user="alice") is not None
    for i in range(4):
        assert limiter.check(T0 + i, "192.0.2.1", user=f"other{i}") is None


@KINDS
def test_relay_network_clients_are_limited_too(kind: str) -> None:
    limiter = new_limiter(kind, RateLimits(per_ip=Rate(3, 60.0)))
    fill(limiter, 3, ip="127.0.0.1")
    assert limiter.check(T0 + 1, "127.0.0.1") is not None


@KINDS
def test_keys_are_case_insensitive(kind: str) -> None:
    limiter = new_limiter(kind, RateLimits(per_user=Rate(1, 60.0), per_sender_domain=Rate(1, 60.0)))
    assert limiter.check(T0, "192.0.2.1", user="Alice") is None
    assert limiter.check(T0, "192.0.2.2", user="alice") is not None
    assert limiter.check(T0, "192.0.2.3", sender_domain="Example.Test") is None
    assert limiter.check(T0, "192.0.2.4", sender_domain="example.test.") is not None


@KINDS
def test_absent_identities_are_not_limited(kind: str) -> None:
    limiter = new_limiter(kind, RateLimits(per_user=Rate(1, 60.0), per_sender_domain=Rate(1, 60.0)))
    for i in range(5):
        assert limiter.check(T0 + i, "192.0.2.1", user=None, sender_domain="") is None


@KINDS
def test_no_limits_configured(kind: str) -> None:
    limiter = new_limiter(kind, RateLimits())
    for i in range(1000):
        assert limiter.check(T0, f"192.0.2.{i % 250}", "u", "d.test") is None
    assert limiter.tracked() == 0


def test_memory_stays_bounded_under_a_flood_of_ips() -> None:
    cap = 5000
    limiter = RateLimiter(
        RateLimits(per_ip=Rate(10, HOUR), per_sender_domain=Rate(10**9, HOUR)), max_keys=cap
    )
    for i in range(100_000):
        ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        assert limiter.check(T0 + i * 0.001, ip, sender_domain=f"d{i}.test") is None
        if i % 10_000 == 0:
            assert limiter.tracked() <= 2 * cap
    assert limiter.tracked() <= 2 * cap
    # a busy client still seen recently keeps its count through the flood
    busy = RateLimiter(RateLimits(per_ip=Rate(3, HOUR)), max_keys=100)
    for i in range(10_000):
        busy.check(T0 + i * 0.001, "192.0.2.99" if i % 50 == 0 else f"198.51.{i >> 8 & 255}.{i}")
    assert busy.check(T0 + 11, "192.0.2.99") is not None
    assert busy.tracked() <= 100


def test_idle_keys_expire() -> None:
    limiter = RateLimiter(RateLimits(per_ip=Rate(10, 60.0)))
    for i in range(100):
        limiter.check(T0, f"192.0.2.{i}")
    assert limiter.tracked() == 100
    limiter.check(T0 + 121, "198.51.100.1")
    assert limiter.tracked() == 1


@KINDS
def test_ipv6_is_counted_per_64(kind: str) -> None:
    limiter = new_limiter(kind, RateLimits(per_ip=Rate(2, 60.0)))
    assert limiter.check(T0, "2001:db8:1:2::1") is None
    assert limiter.check(T0, "2001:db8:1:2::ffff") is None
    assert limiter.check(T0, "2001:db8:1:2:aaaa::1") is not None
    assert limiter.check(T0, "2001:db8:1:3::1") is None
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key("2001:db8::1") == "2001:db8::/64"


@KINDS
def test_reconfigure_keeps_counts(kind: str) -> None:
    limiter = new_limiter(kind, RateLimits(per_ip=Rate(5, HOUR)))
    fill(limiter, 5)
    limiter.reconfigure(RateLimits(per_ip=Rate(6, HOUR), per_user=Rate(1, HOUR)))
    assert limiter.check(T0 + 1, "192.0.2.1") is None  # the sixth fits the new limit
    assert limiter.check(T0 + 2, "192.0.2.1") is not None
    limiter.reconfigure(RateLimits(per_ip=Rate(3, HOUR)))
    assert limiter.check(T0 + 3, "192.0.2.1") is not None


def test_rate_text() -> None:
    assert rate_text(Rate(100, 3600.0)) == "100/hour"
    assert rate_text(Rate(5, 60.0, "5/minute")) == "5/minute"
    assert rate_text(Rate(7, 90.0)) == "7/90s"


@KINDS
@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 50),
    width=st.floats(1.0, 10_000.0),
    gaps=st.lists(st.floats(0.0, 500.0), min_size=1, max_size=120),
)
def test_retry_time_is_never_early_and_always_enough(
    kind: str, count: int, width: float, gaps: list[float]
) -> None:
    """Whatever the traffic, "try again in N s" is honoured exactly at N s."""
    limiter = new_limiter(kind, RateLimits(per_ip=Rate(count, width)))
    now = T0
    for gap in gaps:
        now += gap
        verdict = limiter.check(now, "192.0.2.1")
        if verdict is not None:
            wait = refused_wait(verdict)
            assert limiter.check(now + wait, "192.0.2.1") is None
            now += wait


# -- connections -------------------------------------------------------------------


@KINDS
def test_connection_limits(kind: str) -> None:
    counter = new_counter(kind, Limits(max_connections=3, max_connections_per_ip=2))
    assert counter.acquire("192.0.2.1") is None
    assert counter.acquire("192.0.2.1") is None
    per_ip = counter.acquire("192.0.2.1")
    assert isinstance(per_ip, Refuse) and (per_ip.code, per_ip.enhanced) == (421, "4.7.0")
    assert "too many connections" in per_ip.text
    assert counter.acquire("192.0.2.2") is None
    total = counter.acquire("192.0.2.3")
    assert isinstance(total, Refuse) and (total.code, total.enhanced) == (421, "4.7.0")
    assert counter.total == 3
    counter.release("192.0.2.1")
    assert counter.acquire("192.0.2.3") is None
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        counter.release(ip)
    assert (counter.total, counter.tracked()) == (0, 0)
    counter.release("192.0.2.9")  # never acquired: ignored
    assert counter.total == 0


@KINDS
def test_connection_reconfigure_keeps_open_ones(kind: str) -> None:
    counter = new_counter(kind, Limits(max_connections=10, max_connections_per_ip=10))
    for _ in range(3):
        assert counter.acquire("192.0.2.1") is None
    counter.reconfigure(Limits(max_connections=10, max_connections_per_ip=3))
    assert counter.acquire("192.0.2.1") is not None
    assert counter.count("192.0.2.1") == 3
