"""DMARC policy lookup and alignment, and the Authentication-Results header."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import dns.resolver
import pytest
from support.dnsserver import DNSServer

from relayd.config import DKIMKey, DMARCConfig, DNSConfig, HostPort
from relayd.dkim import DKIMResult, Signer, from_domain, keygen
from relayd.dkimverify import verify_sync
from relayd.dns import make_resolver, make_sync_resolver
from relayd.policy.dmarc import (
    DMARCRecord,
    DMARCResult,
    PolicyLookup,
    aligned,
    check_dmarc,
    check_dmarc_async,
    dmarc_verdict,
    evaluate,
    fetch_policy,
    org_domain,
    parse_record,
)
from relayd.policy.spf import SPFResult
from relayd.policy.verdict import Refuse
from relayd.smtpd.authresults import authentication_results, authserv_id, strip_forged
from relayd.smtpd.content import Content

TAG = DMARCConfig(on_reject="tag")
REJECT = DMARCConfig(on_reject="reject")

ZONE = (
    '_dmarc.reject.test TXT "v=DMARC1; p=reject"',
    '_dmarc.none.test TXT "v=DMARC1; p=none; rua=mailto:d@none.test"',
    '_dmarc.strict.test TXT "v=DMARC1; p=reject; adkim=s; aspf=s"',
    '_dmarc.org.test TXT "v=DMARC1; p=none; sp=reject"',
    '_dmarc.pct.test TXT "v=DMARC1; p=reject; pct=20"',
    '_dmarc.bad.test TXT "v=DMARC1; p=sometimes"',
    '_dmarc.two.test TXT "v=DMARC1; p=reject"',
    '_dmarc.two.test TXT "v=DMARC1; p=none"',
    '_dmarc.other.test TXT "some verification token"',
)


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    with DNSServer() as server:
        server.add(*ZONE)
        server.fault("_dmarc.flaky.test", "servfail")
        yield server


@pytest.fixture
def resolver(dns_server: DNSServer) -> dns.resolver.Resolver:
    return make_sync_resolver(DNSConfig((HostPort("127.0.0.1", dns_server.port),), timeout=1.0))


def spf_pass(domain: str) -> SPFResult:
    return SPFResult("pass", "", "mailfrom", domain)


def dkim_pass(domain: str) -> list[DKIMResult]:
    return [DKIMResult(domain, "sel", "pass")]


# -- pure parts ---------------------------------------------------------------


def test_parse_record() -> None:
    assert parse_record("v=DMARC1; p=reject; sp=none; adkim=s; pct=50") == DMARCRecord(
        "reject", "none", "s", "r", 50
    )
    assert parse_record("v=DMARC1;p=Quarantine") == DMARCRecord("quarantine")
    assert parse_record("v=DMARC1; p=maybe") is None
    assert parse_record("v=DMARC1; p=maybe; rua=mailto:x@y.test") == DMARCRecord("none")


def test_org_domain_heuristic() -> None:
    assert org_domain("mail.Example.COM.") == "example.com"
    assert org_domain("example.com") == "example.com"
    assert org_domain("a.b.example.co.uk") == "example.co.uk"
    assert org_domain("localhost") == "localhost"


def test_alignment_modes() -> None:
    assert aligned("mail.example.test", "example.test", "r")
    assert aligned("a.example.test", "b.example.test", "r")
    assert not aligned("mail.example.test", "example.test", "s")
    assert aligned("EXAMPLE.test", "example.test", "s")
    assert not aligned("example.org", "example.test", "r")
    assert not aligned("", "example.test", "r")


def test_evaluate_needs_a_pass_not_just_a_domain() -> None:
    found = PolicyLookup("found", DMARCRecord("reject"))
    fail_spf = SPFResult("fail", "", "mailfrom", "x.test")
    assert evaluate("x.test", fail_spf, [DKIMResult("x.test", "s", "fail")], found).result == (
        "fail"
    )
    assert evaluate("x.test", None, dkim_pass("x.test"), found).result == "pass"
    assert evaluate("x.test", spf_pass("x.test"), [], found).result == "pass"
    assert evaluate("x.test", spf_pass("elsewhere.test"), [], found).result == "fail"


def test_evaluate_without_a_from_domain() -> None:
    result = evaluate(None, None, [], PolicyLookup("none"))
    assert result.result == "permerror"


# -- with DNS -----------------------------------------------------------------


def test_pass_by_aligned_dkim(resolver: dns.resolver.Resolver) -> None:
    result = check_dmarc(
        resolver,
        "reject.test",
        SPFResult("fail", "", "mailfrom", "x.test"),
        dkim_pass("reject.test"),
    )
    assert result == DMARCResult("pass", "reject", "reject.test")
    assert dmarc_verdict(result, REJECT) is None


def test_pass_by_aligned_spf(resolver: dns.resolver.Resolver) -> None:
    result = check_dmarc(resolver, "reject.test", spf_pass("bounces.reject.test"), [])
    assert result.result == "pass"


def test_fail_under_p_none_is_only_tagged(resolver: dns.resolver.Resolver) -> None:
    result = check_dmarc(resolver, "none.test", spf_pass("spammer.test"), [])
    assert result == DMARCResult("fail", "none", "none.test")
    assert dmarc_verdict(result, REJECT) is None
    header = authentication_results("mx.local.test", None, [], result)
    assert "dmarc=fail (p=none) header.from=none.test" in header


def test_fail_under_p_reject_both_modes(resolver: dns.resolver.Resolver) -> None:
    result = check_dmarc(
        resolver, "reject.test", spf_pass("spammer.test"), [DKIMResult("spammer.test", "s", "pass")]
    )
    assert result == DMARCResult("fail", "reject", "reject.test")
    assert dmarc_verdict(result, TAG) is None
    refusal = dmarc_verdict(result, REJECT)
    assert isinstance(refusal, Refuse)
    assert (refusal.code, refusal.enhanced) == (550, "5.7.1")


def test_relaxed_versus_strict_alignment(resolver: dns.resolver.Resolver) -> None:
    sub = dkim_pass("mail.reject.test")
    assert check_dmarc(resolver, "reject.test", None, sub).result == "pass"
    strict_sub = dkim_pass("mail.strict.test")
    assert check_dmarc(resolver, "strict.test", None, strict_sub).result == "fail"
    assert check_dmarc(resolver, "strict.test", None, dkim_pass("strict.test")).result == "pass"
    spf_sub = spf_pass("bounce.strict.test")
    assert check_dmarc(resolver, "strict.test", spf_sub, []).result == "fail"


def test_subdomain_falls_back_to_org_policy_and_sp(
    dns_server: DNSServer, resolver: dns.resolver.Resolver
) -> None:
    before = len(dns_server.queries)
    result = check_dmarc(resolver, "news.org.test", spf_pass("spammer.test"), [])
    assert result == DMARCResult("fail", "reject", "news.org.test")
    asked = dns_server.queries[before:]
    assert asked == [("_dmarc.news.org.test", "TXT"), ("_dmarc.org.test", "TXT")]
    own = check_dmarc(resolver, "org.test", spf_pass("spammer.test"), [])
    assert own.policy == "none"  # p= for the organizational domain itself


def test_pct_below_100_never_rejects(resolver: dns.resolver.Resolver) -> None:
    result = check_dmarc(resolver, "pct.test", None, [])
    assert (result.result, result.policy) == ("fail", "quarantine")
    assert dmarc_verdict(result, REJECT) is None


def test_no_record_is_none(resolver: dns.resolver.Resolver) -> None:
    for domain in ("nowhere.test", "other.test", "two.test"):
        result = check_dmarc(resolver, domain, None, [])
        assert (result.result, result.policy) == ("none", ""), domain
        assert dmarc_verdict(result, REJECT) is None


def test_broken_record_is_permerror(resolver: dns.resolver.Resolver) -> None:
    assert fetch_policy(resolver, "bad.test").status == "permerror"
    assert check_dmarc(resolver, "bad.test", None, []).result == "permerror"


def test_dns_failure_is_temperror(resolver: dns.resolver.Resolver) -> None:
    result = check_dmarc(resolver, "flaky.test", None, [])
    assert result.result == "temperror"
    assert dmarc_verdict(result, REJECT) is None


def test_async_lookup(dns_server: DNSServer) -> None:
    aresolver = make_resolver(DNSConfig((HostPort("127.0.0.1", dns_server.port),), timeout=1.0))
    result = asyncio.run(check_dmarc_async(aresolver, "news.org.test", None, []))
    assert result == DMARCResult("fail", "reject", "news.org.test")
    flaky = asyncio.run(check_dmarc_async(aresolver, "flaky.test", None, []))
    assert flaky.result == "temperror"


def test_end_to_end_with_a_real_signature(
    tmp_path: Path, dns_server: DNSServer, resolver: dns.resolver.Resolver
) -> None:
    record = keygen(tmp_path / "k.pem", "reject.test", "e2e", kind="ed25519")
    name, strings = record.split(" IN TXT ")
    text = "".join(re.findall(r'"([^"]*)"', strings))
    dns_server.add(f'{name} TXT "{text}"')
    message = b"From: a@reject.test\r\nTo: b@x.test\r\nSubject: s\r\n\r\nhi\r\n"
    signed = Signer([DKIMKey("reject.test", "e2e", tmp_path / "k.pem")]).sign(message)
    assert signed is not None
    dkim = verify_sync(Content.from_bytes(signed), resolver)
    result = check_dmarc(resolver, from_domain(signed), None, dkim)
    assert result.result == "pass"
    forged = message.replace(b"hi", b"pay me")
    forged_dkim = verify_sync(Content.from_bytes(forged), resolver)
    assert check_dmarc(resolver, from_domain(forged), None, forged_dkim).result == "fail"


# -- Authentication-Results -----------------------------------------------------


def test_authentication_results_value() -> None:
    value = authentication_results(
        "mx.local.test",
        SPFResult("pass", "", "mailfrom", "example.test"),
        [DKIMResult("example.test", "s1", "pass"), DKIMResult("example.test", "s2", "fail")],
        DMARCResult("pass", "reject", "example.test"),
    )
    assert value == (
        "mx.local.test; spf=pass smtp.mailfrom=example.test; "
        "dkim=pass header.d=example.test header.s=s1; "
        "dkim=fail header.d=example.test header.s=s2; "
        "dmarc=pass (p=reject) header.from=example.test"
    )


def test_authentication_results_helo_and_none() -> None:
    value = authentication_results(
        "mx.local.test", SPFResult("none", "", "helo", "client.test"), [DKIMResult("", "", "none")]
    )
    assert value == "mx.local.test; spf=none smtp.helo=client.test; dkim=none"
    assert authentication_results("mx.local.test") == "mx.local.test; none"


def test_forged_authentication_results_are_removed() -> None:
    message = (
        b"Received: from x\r\n"
        b"Authentication-Results: MX.Local.Test; dkim=pass header.d=bank.test\r\n"
        b"Authentication-Results: other.test; spf=pass smtp.mailfrom=x.test\r\n"
        b"Authentication-Results:\r\n mx.local.test;\r\n dmarc=pass\r\n"
        b'authentication-results: (comment) "mx.local.test" 1; none\r\n'
        b"Subject: hi\r\n"
        b"\r\n"
        b"Authentication-Results: mx.local.test; body text stays\r\n"
    )
    cleaned = strip_forged(message, "mx.local.test")
    assert cleaned == (
        b"Received: from x\r\n"
        b"Authentication-Results: other.test; spf=pass smtp.mailfrom=x.test\r\n"
        b"Subject: hi\r\n"
        b"\r\n"
        b"Authentication-Results: mx.local.test; body text stays\r\n"
    )


def test_strip_forged_keeps_lf_messages_and_lookalikes() -> None:
    message = (
        b"Authentication-Results: mx.local.test.evil.test; spf=pass\n"
        b"Authentication-Results: mx.local.test; spf=pass\n"
        b"\n"
        b"body\n"
    )
    assert strip_forged(message, "mx.local.test") == (
        b"Authentication-Results: mx.local.test.evil.test; spf=pass\n\nbody\n"
    )


def test_authserv_id() -> None:
    assert authserv_id(b" Mail.Example.COM; spf=pass") == "mail.example.com"
    assert authserv_id(b" mail.example.com 1; none") == "mail.example.com"
    assert authserv_id(b' (c) "mail.example.com"; none') == "mail.example.com"


@pytest.mark.parametrize("ours", ["mx.local.test", "MX.local.test.", "mx.local.test."])
def test_strip_forged_on_a_header_block(ours: str) -> None:
    """The session's call: a header block without body; folding, case, dots, nested comments."""
    header = (
        b"Received: from x\r\n"
        b"AUTHENTICATION-RESULTS : Mx.Local.Test.;\r\n\tdkim=pass\r\n"
        b"Authentication-Results:\r\n (a (nested) comment)\r\n  mx.local.test (c); spf=pass\r\n"
        b"Authentication-Results: mx.local.test.evil.test; spf=pass\r\n"
        b"Authentication-Results: (mx.local.test) other.test; spf=pass\r\n"
        b"Subject: hi\r\n"
    )
    assert strip_forged(header, ours) == (
        b"Received: from x\r\n"
        b"Authentication-Results: mx.local.test.evil.test; spf=pass\r\n"
        b"Authentication-Results: (mx.local.test) other.test; spf=pass\r\n"
        b"Subject: hi\r\n"
    )


def test_authserv_id_after_deeply_nested_comments_is_linear() -> None:
    value = b" " + b"(" * 50_000 + b")" * 50_000 + b" mx.local.test; none"
    started = time.monotonic()
    assert authserv_id(value) == "mx.local.test"
    assert time.monotonic() - started < 2.0
