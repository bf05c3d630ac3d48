"""Next-hop selection against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.dnsserver import DNSServer

from relayd.config import Config, DeliveryConfig, DNSConfig, HostPort, Route
from relayd.delivery.nexthop import NextHops, Resolution, match_route, order_mx
from relayd.dns import make_resolver


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    with DNSServer("127.0.0.1") as server:
        yield server


def make_config(dns_server: DNSServer, *routes: Route, port: int = 2525) -> Config:
    return Config(
        hostname="relay.example.test",
        routes=routes,
        delivery=DeliveryConfig(port=port),
        dns=DNSConfig(nameservers=(HostPort("127.0.0.1", dns_server.port),), timeout=0.5),
    )


def resolve(hops: NextHops, domain: str) -> Resolution:
    return asyncio.run(asyncio.wait_for(hops.resolve(domain), 10))


def next_hops(config: Config, **kw: object) -> NextHops:
    return NextHops(config, make_resolver(config.dns), **kw)  # type: ignore[arg-type]


def test_mx_by_preference_with_addresses_and_port(dns_server: DNSServer) -> None:
    dns_server.add(
        "example.test MX 20 mx2.example.test",
        "example.test MX 10 mx1.example.test",
        "mx1.example.test A 127.0.0.2",
        "mx1.example.test AAAA ::1",
        "mx2.example.test A 127.0.0.3",
    )
    res = resolve(next_hops(make_config(dns_server)), "Example.TEST")
    assert res.failure is None
    assert [(h.host, h.addresses, h.port, h.preference) for h in res.hops] == [
        ("mx1.example.test", ["127.0.0.2", "::1"], 2525, 10),
        ("mx2.example.test", ["127.0.0.3"], 2525, 20),
    ]
    assert all(h.route is None for h in res.hops)


def test_equal_preference_is_shuffled(dns_server: DNSServer) -> None:
    dns_server.add(
        "example.test MX 10 a.example.test",
        "example.test MX 10 b.example.test",
        "example.test MX 5 first.example.test",
        "a.example.test A 127.0.0.2",
        "b.example.test A 127.0.0.3",
        "first.example.test A 127.0.0.4",
    )
    hops = next_hops(make_config(dns_server), rng=random.Random(7))
    orders = {tuple(h.host for h in resolve(hops, "example.test").hops) for _ in range(20)}
    assert orders == {
        ("first.example.test", "a.example.test", "b.example.test"),
        ("first.example.test", "b.example.test", "a.example.test"),
    }


def test_order_mx_is_stable_by_preference() -> None:
    records = [(30, "c"), (10, "a"), (20, "b"), (10, "a2")]
    ordered = order_mx(records, random.Random(1))
    assert [p for p, _ in ordered] == [10, 10, 20, 30]
    assert {h for _, h in ordered[:2]} == {"a", "a2"}


def test_implicit_mx_when_no_mx(dns_server: DNSServer) -> None:
    dns_server.add("plain.test A 127.0.0.5", 'plain.test TXT "hello"')
    res = resolve(next_hops(make_config(dns_server)), "plain.test")
    assert res.failure is None
    assert [(h.host, h.addresses, h.port) for h in res.hops] == [
        ("plain.test", ["127.0.0.5"], 2525)
    ]


def test_no_mx_and_no_address_fails(dns_server: DNSServer) -> None:
    dns_server.add('bare.test TXT "v=spf1 -all"')
    res = resolve(next_hops(make_config(dns_server)), "bare.test")
    assert res.failure is not None and res.failure.permanent
    assert res.hops == []


def test_null_mx_fails_permanently(dns_server: DNSServer) -> None:
    dns_server.add("nomail.test MX 0 .", "nomail.test A 127.0.0.2")
    res = resolve(next_hops(make_config(dns_server)), "nomail.test")
    assert res.hops == []
    assert res.failure is not None
    assert res.failure.permanent and res.failure.enhanced == "5.1.10"
    assert ("nomail.test", "A") not in dns_server.queries


def test_nxdomain_fails_permanently(dns_server: DNSServer) -> None:
    res = resolve(next_hops(make_config(dns_server)), "nowhere.test")
    assert res.failure is not None
    assert res.failure.permanent and res.failure.enhanced == "5.1.2"
    assert "nowhere.test" in res.failure.reply


@pytest.mark.parametrize("kind", ["servfail", "timeout"])
def test_dns_trouble_defers(dns_server: DNSServer, kind: str) -> None:
    dns_server.fault("broken.test", kind)
    res = resolve(next_hops(make_config(dns_server)), "broken.test")
    assert res.failure is not None
    assert res.failure.temporary and res.failure.enhanced == "4.4.3"


def test_truncated_answer_is_retried_over_tcp(dns_server: DNSServer) -> None:
    dns_server.add("big.test MX 10 mx.big.test", "mx.big.test A 127.0.0.2")
    dns_server.fault("big.test", "truncate", "MX")
    res = resolve(next_hops(make_config(dns_server)), "big.test")
    assert [h.host for h in res.hops] == ["mx.big.test"]


def test_unresolvable_mx_hosts_are_skipped_or_defer(dns_server: DNSServer) -> None:
    dns_server.add(
        "half.test MX 10 gone.half.test",
        "half.test MX 20 ok.half.test",
        "ok.half.test A 127.0.0.3",
        "dead.test MX 10 gone.dead.test",
        "flaky.test MX 10 mx.flaky.test",
    )
    dns_server.fault("mx.flaky.test", "servfail")
    hops = next_hops(make_config(dns_server))
    assert [h.host for h in resolve(hops, "half.test").hops] == ["ok.half.test"]
    dead = resolve(hops, "dead.test").failure
    assert dead is not None and dead.temporary and dead.enhanced == "4.4.4"
    flaky = resolve(hops, "flaky.test").failure
    assert flaky is not None and flaky.temporary and flaky.enhanced == "4.4.3"


def test_answers_are_cached_within_ttl(dns_server: DNSServer) -> None:
    dns_server.add(
        "example.test 60 MX 10 mx1.example.test",
        "mx1.example.test 60 A 127.0.0.2",
        "mx1.example.test 60 AAAA ::1",
    )
    now = [1000.0]
    hops = next_hops(make_config(dns_server), clock=lambda: now[0])
    first = resolve(hops, "example.test")
    asked = len(dns_server.queries)
    assert asked >= 2
    now[0] += 59
    assert resolve(hops, "example.test") == first
    assert len(dns_server.queries) == asked
    now[0] += 2
    resolve(hops, "example.test")
    assert dns_server.queries[asked:].count(("example.test", "MX")) == 1


def test_errors_are_not_cached(dns_server: DNSServer) -> None:
    dns_server.add("example.test MX 10 mx1.example.test", "mx1.example.test A 127.0.0.2")
    dns_server.fault("example.test", "servfail")
    hops = next_hops(make_config(dns_server))
    assert resolve(hops, "example.test").failure is not None
    dns_server.unfault("example.test")
    assert resolve(hops, "example.test").failure is None


def test_route_exact_beats_star_and_skips_mx(dns_server: DNSServer, tmp_path: Path) -> None:
    star = Route("*", HostPort("127.0.0.9", 587))
    exact = Route("example.test", HostPort("smart.example.test", 2587), tls="implicit")
    dns_server.add("smart.example.test A 127.0.0.8")
    hops = next_hops(make_config(dns_server, star, exact))
    res = resolve(hops, "EXAMPLE.test")
    assert [(h.host, h.addresses, h.port, h.route) for h in res.hops] == [
        ("smart.example.test", ["127.0.0.8"], 2587, exact)
    ]
    other = resolve(hops, "other.test")
    assert [(h.host, h.addresses, h.port, h.route) for h in other.hops] == [
        ("127.0.0.9", ["127.0.0.9"], 587, star)
    ]
    assert not any(q[1] == "MX" for q in dns_server.queries)


def test_route_to_unknown_host_defers(dns_server: DNSServer) -> None:
    route = Route("*", HostPort("missing.example.test", 25))
    res = resolve(next_hops(make_config(dns_server, route)), "example.test")
    assert res.failure is not None and res.failure.temporary


def test_match_route() -> None:
    a, b = Route("*", HostPort("h", 1)), Route("x.test", HostPort("h", 2))
    assert match_route((a, b), "X.test.") is b
    assert match_route((a, b), "y.test") is a
    assert match_route((b,), "y.test") is None


def test_domain_literal(dns_server: DNSServer) -> None:
    hops = next_hops(make_config(dns_server))
    res = resolve(hops, "[127.0.0.7]")
    assert [(h.host, h.addresses) for h in res.hops] == [("127.0.0.7", ["127.0.0.7"])]
    res6 = resolve(hops, "[IPv6:::1]")
    assert [h.addresses for h in res6.hops] == [["::1"]]
    assert dns_server.queries == []
