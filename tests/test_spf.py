"""SPF against a real DNS server on loopback, through relayd's resolver factory."""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Iterator

import dns.resolver
import pytest
import spf
from support.dnsserver import DNSServer

from relayd.config import DNSConfig, HostPort, SPFConfig
from relayd.dns import DNSTempError, make_resolver, make_sync_resolver, txt_records
from relayd.policy.spf import (
    SPFResult,
    check_spf,
    check_spf_async,
    received_spf_header,
    spf_verdict,
)
from relayd.policy.verdict import Refuse

CLIENT = "127.0.0.1"

ZONE = (
    'pass.test TXT "v=spf1 ip4:127.0.0.1 -all"',
    'fail.test TXT "v=spf1 ip4:192.0.2.1 -all"',
    'soft.test TXT "v=spf1 ip4:192.0.2.1 ~all"',
    'neutral.test TXT "v=spf1 ?all"',
    "nospf.test A 192.0.2.9",
    'broken.test TXT "v=spf1 ip4:127.0.0.1 bogus -all"',
    'mx.test TXT "v=spf1 mx -all"',
    "mx.test MX 10 mail.mx.test",
    "mail.mx.test A 127.0.0.1",
    'include.test TXT "v=spf1 include:pass.test -all"',
    'v6.test TXT "v=spf1 ip6:::1 -all"',
    'helo.test TXT "v=spf1 a -all"',
    "helo.test A 127.0.0.1",
    'badhelo.test TXT "v=spf1 -all"',
    'exp.test TXT "v=spf1 -all exp=why.exp.test"',
    'why.exp.test TXT "go away\\013\\010X-Injected: yes"',
)


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    with DNSServer() as server:
        server.add(*ZONE)
        server.fault("servfail.test", "servfail")
        server.fault("slow.test", "timeout")
        yield server


@pytest.fixture
def resolver(dns_server: DNSServer) -> dns.resolver.Resolver:
    return make_sync_resolver(DNSConfig((HostPort("127.0.0.1", dns_server.port),), timeout=1.0))


def check(resolver: dns.resolver.Resolver, mail_from: str, helo: str = "client.test") -> SPFResult:
    return check_spf(CLIENT, helo, mail_from, resolver, timeout=5.0)


REJECT = SPFConfig(on_fail="reject")
TAG = SPFConfig(on_fail="tag")


def test_pass(resolver: dns.resolver.Resolver) -> None:
    result = check(resolver, "alice@pass.test")
    assert (result.result, result.identity, result.domain) == ("pass", "mailfrom", "pass.test")
    assert spf_verdict(result, REJECT) is None


def test_pass_through_mx_and_include(resolver: dns.resolver.Resolver) -> None:
    assert check(resolver, "a@mx.test").result == "pass"
    assert check(resolver, "a@include.test").result == "pass"


def test_angle_brackets_are_accepted(resolver: dns.resolver.Resolver) -> None:
    assert check(resolver, "<alice@pass.test>").result == "pass"


def test_ipv6_client(resolver: dns.resolver.Resolver) -> None:
    result = check_spf("::1", "client.test", "a@v6.test", resolver, timeout=5.0)
    assert result.result == "pass"
    assert check_spf("::2", "client.test", "a@v6.test", resolver, 5.0).result == "fail"


def test_fail_rejected(resolver: dns.resolver.Resolver) -> None:
    result = check(resolver, "alice@fail.test")
    assert result.result == "fail"
    verdict = spf_verdict(result, REJECT)
    assert isinstance(verdict, Refuse)
    assert (verdict.code, verdict.enhanced) == (550, "5.7.23")
    assert "fail.test" in verdict.text


def test_fail_tagged(resolver: dns.resolver.Resolver) -> None:
    result = check(resolver, "alice@fail.test")
    assert spf_verdict(result, TAG) is None
    header = received_spf_header(result, "mx.local.test", CLIENT, "client.test", "alice@fail.test")
    assert header.startswith("fail (mx.local.test: domain of fail.test does not designate")


def test_fail_explanation_cannot_inject_reply_lines(resolver: dns.resolver.Resolver) -> None:
    result = check(resolver, "a@exp.test")
    verdict = spf_verdict(result, REJECT)
    assert isinstance(verdict, Refuse)
    assert "\r" not in verdict.reply() and "\n" not in verdict.reply()


def test_softfail_is_tagged_by_default(resolver: dns.resolver.Resolver) -> None:
    result = check(resolver, "alice@soft.test")
    assert result.result == "softfail"
    assert spf_verdict(result, REJECT) is None
    strict = spf_verdict(result, SPFConfig(on_softfail="reject"))
    assert isinstance(strict, Refuse) and strict.code == 550


def test_neutral(resolver: dns.resolver.Resolver) -> None:
    result = check(resolver, "alice@neutral.test")
    assert result.result == "neutral"
    assert spf_verdict(result, REJECT) is None


@pytest.mark.parametrize("sender", ["alice@nospf.test", "alice@nowhere.test"])
def test_none(resolver: dns.resolver.Resolver, sender: str) -> None:
    result = check(resolver, sender)
    assert result.result == "none"
    assert spf_verdict(result, REJECT) is None


@pytest.mark.parametrize("domain", ["servfail.test", "slow.test"])
def test_temperror(resolver: dns.resolver.Resolver, domain: str) -> None:
    result = check(resolver, f"alice@{domain}")
    assert result.result == "temperror"
    verdict = spf_verdict(result, TAG)
    assert isinstance(verdict, Refuse)
    assert (verdict.code, verdict.enhanced) == (451, "4.7.24")


def test_permerror_is_accepted(resolver: dns.resolver.Resolver) -> None:
    result = check(resolver, "alice@broken.test")
    assert result.result == "permerror"
    assert spf_verdict(result, REJECT) is None


@pytest.mark.parametrize("null", ["", "<>"])
def test_null_sender_checks_helo(
    dns_server: DNSServer, resolver: dns.resolver.Resolver, null: str
) -> None:
    before = len(dns_server.queries)
    result = check(resolver, null, helo="helo.test")
    assert (result.result, result.identity, result.domain) == ("pass", "helo", "helo.test")
    assert ("helo.test", "TXT") in dns_server.queries[before:]
    refused = check(resolver, null, helo="badhelo.test")
    assert (refused.result, refused.identity) == ("fail", "helo")


def test_queries_go_to_the_configured_server(
    dns_server: DNSServer, resolver: dns.resolver.Resolver
) -> None:
    before = len(dns_server.queries)
    check(resolver, "a@mx.test")
    asked = dns_server.queries[before:]
    assert ("mx.test", "TXT") in asked
    assert ("mx.test", "MX") in asked
    assert ("mail.mx.test", "A") in asked
    assert spf.DNSLookup is not spf.DNSLookup_dnspython


def test_no_deprecation_warning(resolver: dns.resolver.Resolver) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check(resolver, "a@mx.test").result == "pass"


def test_concurrent_checks_keep_their_own_resolver() -> None:
    """Two configs (e.g. across a reload) with different DNS at once in threads."""
    with DNSServer() as first, DNSServer() as second:
        first.add('twin.test TXT "v=spf1 ip4:127.0.0.1 -all"')
        second.add('twin.test TXT "v=spf1 -all"')
        resolvers = {
            "pass": make_sync_resolver(DNSConfig((HostPort("127.0.0.1", first.port),), 2.0)),
            "fail": make_sync_resolver(DNSConfig((HostPort("127.0.0.1", second.port),), 2.0)),
        }
        wrong: list[str] = []

        def run(expected: str) -> None:
            for _ in range(20):
                result = check(resolvers[expected], "a@twin.test")
                if result.result != expected:
                    wrong.append(result.result)

        threads = [threading.Thread(target=run, args=(kind,)) for kind in ("pass", "fail") * 3]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not wrong
        assert first.queries and second.queries


def test_async_check(resolver: dns.resolver.Resolver) -> None:
    result = asyncio.run(check_spf_async(CLIENT, "client.test", "a@pass.test", resolver, 5.0))
    assert result.result == "pass"


def test_async_timeout_is_temperror(dns_server: DNSServer) -> None:
    patient = make_sync_resolver(DNSConfig((HostPort("127.0.0.1", dns_server.port),), 10.0))
    started = time.monotonic()
    result = asyncio.run(check_spf_async(CLIENT, "client.test", "a@slow.test", patient, 0.5))
    assert time.monotonic() - started < 5.0
    assert (result.result, result.domain) == ("temperror", "slow.test")


def test_disabled_never_refuses() -> None:
    result = SPFResult("fail", "no", "mailfrom", "fail.test")
    assert spf_verdict(result, SPFConfig(enabled=False)) is None


def test_received_spf_field_shape() -> None:
    result = SPFResult("pass", "ok", "mailfrom", "pass.test")
    value = received_spf_header(
        result, "mx.local.test", "192.0.2.7", "client.test", "<a@pass.test>"
    )
    assert value == (
        "pass (mx.local.test: domain of pass.test designates 192.0.2.7 as permitted sender) "
        'client-ip=192.0.2.7; envelope-from="a@pass.test"; helo=client.test; '
        "receiver=mx.local.test; identity=mailfrom"
    )


def test_received_spf_quotes_hostile_helo() -> None:
    result = SPFResult("none", "", "helo", 'x"y')
    value = received_spf_header(result, "mx.local.test", "192.0.2.7", 'x"y\r\nX-Evil: 1', "")
    assert "\r" not in value and "\n" not in value
    assert 'helo="x\\"yX-Evil: 1"' in value
    assert "identity=helo" in value


def test_txt_records_tell_absence_from_failure(
    dns_server: DNSServer, resolver: dns.resolver.Resolver
) -> None:
    assert txt_records(resolver, "pass.test") == ["v=spf1 ip4:127.0.0.1 -all"]
    assert txt_records(resolver, "nowhere.test") == []
    assert txt_records(resolver, "nospf.test") == []  # the name exists, no TXT
    with pytest.raises(DNSTempError):
        txt_records(resolver, "servfail.test")
    with pytest.raises(DNSTempError):
        txt_records(resolver, "slow.test")


def test_async_resolver_honours_config(dns_server: DNSServer) -> None:
    resolver = make_resolver(DNSConfig((HostPort("127.0.0.1", dns_server.port),), 1.5))
    assert resolver.lifetime == 1.5

    async def ask() -> list[str]:
        answer = await resolver.resolve("pass.test", "TXT")
        return [b"".join(r.strings).decode() for r in answer]

    assert asyncio.run(ask()) == ["v=spf1 ip4:127.0.0.1 -all"]


def test_no_nameservers_is_temporary() -> None:
    resolver = make_sync_resolver(DNSConfig((), 1.0))
    resolver.nameservers = []
    with pytest.raises(DNSTempError):
        txt_records(resolver, "pass.test")


def test_impossible_names_have_no_records(resolver: dns.resolver.Resolver) -> None:
    assert txt_records(resolver, "a" * 70 + ".test") == []
    assert txt_records(resolver, "a..test") == []
    result = check(resolver, "alice@" + "a" * 70 + ".test")
    assert result.result == "none"
