"""MTA-STS discovery, fetch and cache (RFC 8461) against real DNS and HTTPS on loopback.

The parsing rules are plain functions, tested without sockets; the lookup
is tested with the loopback DNS server answering ``_mta-sts`` TXT and
``mta-sts.DOMAIN`` A queries and an HTTPS server on 127.0.0.x:443 with a
certificate from the test CA.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from support.certs import ca, server_cert_files
from support.dnsserver import DNSServer
from support.stsserver import STSServer

from relayd.delivery.mta_sts import (
    MTASTS,
    Policy,
    PolicyError,
    PolicyStore,
    mx_matches,
    parse_policy,
    parse_txt,
)

POLICY = (
    "version: STSv1\r\nmode: enforce\r\n"
    "mx: mx1.sts.test\r\nmx: *.backup.sts.test\r\nmax_age: 86400\r\n"
)


# ---- plain data -------------------------------------------------------------------------------


def test_txt_record_gives_the_id_only_when_there_is_exactly_one() -> None:
    assert parse_txt(["v=STSv1; id=20260101T000000;"]) == "20260101T000000"
    assert parse_txt(["v=spf1 -all", "v=STSv1; id=abc"]) == "abc"
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two: none (RFC 8461 3.1)
    assert parse_txt(["v=STSv1;"]) is None
    assert parse_txt(["v=STSv1; id=has-dash"]) is None  # id is 1*32 alphanumerics
    assert parse_txt([]) is None


def test_policy_file_is_parsed_and_checked() -> None:
    policy = parse_policy(POLICY)
    assert policy == Policy("enforce", ("mx1.sts.test", "*.backup.sts.test"), 86400)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 5\n").mx == ()
    for bad in (
        "mode: enforce\nmx: a.test\nmax_age: 1\n",  # no version
        "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmax_age: 1\n",  # enforce without mx
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 99999999999\n",
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: soon\n",
        "<html>not a policy</html>",
    ):
        with pytest.raises(PolicyError):
            parse_policy(bad)


def test_mx_patterns_match_one_left_label_at_most() -> None:
    assert mx_matches("mx1.sts.test", "MX1.sts.test.")
    assert mx_matches("*.backup.sts.test", "a.backup.sts.test")
    assert not mx_matches("*.backup.sts.test", "backup.sts.test")
    assert not mx_matches("*.backup.sts.test", "a.b.backup.sts.test")
    assert not mx_matches("mx1.sts.test", "evil-mx1.sts.test")


# ---- lookups against DNS and HTTPS on loopback -----------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def trust() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.load_verify_locations(cadata=ca().cert_pem.bytes().decode("ascii"))
    return context


@pytest.fixture
def sts_dns(dns_server: DNSServer) -> DNSServer:
    dns_server.add('_mta-sts.sts.test TXT "v=STSv1; id=one"', "mta-sts.sts.test A 127.0.0.61")
    return dns_server


def make(dns_server: DNSServer, tmp_path: Path, clock: Clock | None = None) -> MTASTS:
    return MTASTS(
        dns_server.async_resolver(),
        PolicyStore(tmp_path / "mta-sts"),
        trust(),
        dns_timeout=1.0,
        clock=clock or Clock(),
    )


def cert(tmp_path: Path, name: str = "mta-sts.sts.test") -> tuple[Path, Path]:
    return server_cert_files(tmp_path, name)


def test_policy_is_fetched_over_verified_https_and_cached(
    sts_dns: DNSServer, tmp_path: Path
) -> None:
    with STSServer("127.0.0.61", cert(tmp_path), POLICY) as web:
        sts = make(sts_dns, tmp_path)
        first = asyncio.run(sts.lookup("STS.test"))
        second = asyncio.run(sts.lookup("sts.test"))
    assert first.policy == parse_policy(POLICY)
    assert first.note == "fetched policy"
    assert second.policy == first.policy
    assert web.requests == [("/.well-known/mta-sts.txt", "mta-sts.sts.test")]
    assert (tmp_path / "mta-sts" / "sts.test.json").exists()


def test_cached_policy_survives_a_restart_and_a_dead_policy_server(
    sts_dns: DNSServer, tmp_path: Path
) -> None:
    with STSServer("127.0.0.61", cert(tmp_path), POLICY):
        asyncio.run(make(sts_dns, tmp_path).lookup("sts.test"))
    # A new process (new object, same spool); the TXT id changed, the server is gone.
    sts_dns.remove("_mta-sts.sts.test")
    sts_dns.add('_mta-sts.sts.test TXT "v=STSv1; id=two"')
    again = asyncio.run(make(sts_dns, tmp_path).lookup("sts.test"))
    assert again.policy == parse_policy(POLICY)
    assert again.note.startswith("cached policy (fetch failed")
    # TXT lookups blocked by an attacker: the cached policy still holds.
    sts_dns.fault("_mta-sts.sts.test", "servfail")
    blocked = asyncio.run(make(sts_dns, tmp_path).lookup("sts.test"))
    assert blocked.policy == parse_policy(POLICY)


def test_expired_policy_is_forgotten(sts_dns: DNSServer, tmp_path: Path) -> None:
    clock = Clock()
    with STSServer("127.0.0.61", cert(tmp_path), POLICY):
        asyncio.run(make(sts_dns, tmp_path, clock).lookup("sts.test"))
    clock.now += 86400 + 1
    sts_dns.remove("_mta-sts.sts.test")
    sts_dns.add('_mta-sts.sts.test TXT "v=STSv1; id=two"')
    assert asyncio.run(make(sts_dns, tmp_path, clock).lookup("sts.test")).policy is None


def test_new_txt_id_refreshes_the_policy(sts_dns: DNSServer, tmp_path: Path) -> None:
    clock = Clock()
    sts = make(sts_dns, tmp_path, clock)
    with STSServer("127.0.0.61", cert(tmp_path), POLICY) as web:
        asyncio.run(sts.lookup("sts.test"))
        web.body = POLICY.replace("enforce", "testing")
        sts_dns.remove("_mta-sts.sts.test")
        sts_dns.add('_mta-sts.sts.test TXT "v=STSv1; id=two"')
        asked = len(sts_dns.queries)
        assert asyncio.run(sts.lookup("sts.test")).policy == parse_policy(POLICY)
        assert len(sts_dns.queries) == asked  # within 5 minutes: no new TXT query
        clock.now += 301
        refreshed = asyncio.run(sts.lookup("sts.test"))
    assert refreshed.policy is not None and refreshed.policy.mode == "testing"
    assert len(web.requests) == 2


@pytest.mark.parametrize(
    ("server_name", "status", "content_type", "why"),
    [
        ("wrong.sts.test", 200, "text/plain", "CERTIFICATE_VERIFY_FAILED"),
        ("mta-sts.sts.test", 404, "text/plain", "HTTP 404"),
        ("mta-sts.sts.test", 200, "text/html", "not text/plain"),
    ],
)
def test_a_policy_that_cannot_be_trusted_is_not_used(
    sts_dns: DNSServer,
    tmp_path: Path,
    server_name: str,
    status: int,
    content_type: str,
    why: str,
) -> None:
    with STSServer(
        "127.0.0.61", cert(tmp_path, server_name), POLICY, status=status, content_type=content_type
    ):
        result = asyncio.run(make(sts_dns, tmp_path).lookup("sts.test"))
    assert result.policy is None
    assert why in result.note


def test_domain_without_txt_has_no_policy_and_no_fetch(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    with STSServer("127.0.0.61", cert(tmp_path), POLICY) as web:
        result = asyncio.run(make(dns_server, tmp_path).lookup("plain.test"))
    assert result.policy is None
    assert web.requests == []


def test_huge_policy_body_is_refused(sts_dns: DNSServer, tmp_path: Path) -> None:
    body = POLICY + "x: " + "y" * 100_000 + "\r\n"
    with STSServer("127.0.0.61", cert(tmp_path), body):
        result = asyncio.run(make(sts_dns, tmp_path).lookup("sts.test"))
    assert result.policy is None
    assert "larger than" in result.note
