"""Mail policy end to end: DKIM signing, SPF, DMARC and rate limits on the real daemon.

relayd runs as a real process. A DNS server on 127.0.0.1 publishes the
test records (SPF, DKIM keys, DMARC policies) and an SMTP server on
127.0.0.2 stands in for a remote MX. What relayd sends out is judged by
dkimpy and pyspf themselves; what it refuses, by the reply; what it
accepts, by the stored message (``relayctl queue show ID --raw``).

Clients choose their source address inside 127.0.0.0/8, so one machine
plays an Internet client (outside ``[relay] networks``), a host inside
those networks, and several separately rate-limited clients.
"""

from __future__ import annotations

import email
import json
import re
import smtplib
import time
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import dkim
import pytest
from support.certs import client_context, server_cert_files
from support.dnsserver import DNSServer
from support.mxserver import MXServer, ReceivedMessage
from support.ports import free_port
from support.relayd_proc import HOSTNAME, Relayd, send

from relayd.dkim import keygen
from relayd.dns import dkim_dnsfunc
from relayd.policy.spf import check_spf

PASSWORD = "correct horse battery"
TIMEOUT = 10.0

# (domain, selector, key type) for the signing relay; rotate.test is mid-rollover.
KEYS = (
    ("example.com", "sel1", "rsa"),
    ("rotate.test", "old", "rsa"),
    ("rotate.test", "new", "rsa"),
    ("ed.test", "ed1", "ed25519"),
)

# 127.0.0.1 is outside [relay] networks here: an ordinary Internet client.
INBOUND = """
[relay]
domains = ["example.org"]
networks = ["127.0.0.5/32"]
"""

RATES = """
[relay]
domains = ["example.org"]
networks = ["127.0.0.7/32"]

[rate_limits]
per_ip = "2/minute"
per_user = "2/minute"
"""


# ---- helpers ----------------------------------------------------------------------------


def msg(from_: str, subject: str, to: str = "bob@example.org", body: str = "Hello.") -> bytes:
    return (
        f"From: {from_}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@client.test>\r\n\r\n{body}\r\n"
    ).encode()


def connect(r: Relayd, listener: str = "inbound", source: str = "127.0.0.1") -> smtplib.SMTP:
    """A client on ``listener`` connecting from ``source`` (a loopback address)."""
    port = r.port(listener)
    if listener == "submissions":
        return smtplib.SMTP_SSL(
            "127.0.0.1",
            port,
            timeout=TIMEOUT,
            context=client_context(),
            source_address=(source, 0),
        )
    return smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT, source_address=(source, 0))


def inject(
    r: Relayd,
    sender: str,
    message: bytes,
    rcpt: str = "bob@example.org",
    source: str = "127.0.0.1",
) -> str:
    """One message over the inbound listener, without AUTH; its queue id."""
    with connect(r, "inbound", source) as s:
        s.ehlo("client.test")
        return send(s, sender, [rcpt], message)


def stored(r: Relayd, qid: str) -> Message:
    out = r.ctl("queue", "show", qid, "--raw")
    assert out.returncode == 0, out.stderr
    return email.message_from_string(out.stdout)


def values(m: Message, name: str) -> list[str]:
    """Every ``name`` field of ``m``, unfolded."""
    return [" ".join(str(v).split()) for v in m.get_all(name, [])]


def auth_results(m: Message) -> str:
    """The one Authentication-Results field naming us."""
    ours = [v for v in values(m, "Authentication-Results") if v.lower().startswith(HOSTNAME)]
    assert len(ours) == 1, values(m, "Authentication-Results")
    return ours[0]


def queued_ids(r: Relayd) -> set[str]:
    out = r.ctl("--json", "queue")
    assert out.returncode == 0, out.stderr
    return {m["queue_id"] for m in json.loads(out.stdout)["messages"]}


def delivered(mx: MXServer, subject: str, timeout: float = TIMEOUT) -> ReceivedMessage:
    """The message with ``subject`` once the MX has accepted it."""
    needle = f"\r\nSubject: {subject}\r\n".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in list(mx.messages):
            if needle in m.data:
                return m
        time.sleep(0.05)
    raise TimeoutError(f"{subject!r} not delivered in {timeout}s")


def signatures(data: bytes) -> list[dict[str, str]]:
    """The tags of each DKIM-Signature field, top first."""
    fields = values(email.message_from_bytes(data), "DKIM-Signature")
    return [
        {k.strip(): re.sub(r"\s", "", v) for k, _, v in (t.partition("=") for t in f.split(";"))}
        for f in fields
    ]


def dkimpy_verifies(data: bytes, zone: DNSServer, idx: int = 0) -> bool:
    """dkimpy's own verdict on signature ``idx``, keys fetched from the test DNS."""
    return bool(dkim.DKIM(data).verify(idx=idx, dnsfunc=dkim_dnsfunc(zone.resolver())))


# ---- the world: DNS records, a signing key held by a remote domain ---------------------


@pytest.fixture(scope="module")
def zone() -> Iterator[DNSServer]:
    with DNSServer() as server:
        server.add(
            "example.org MX 10 mx1.test",
            "mx1.test A 127.0.0.2",
            'bad.test TXT "v=spf1 ip4:192.0.2.1 -all"',
            'soft.test TXT "v=spf1 ip4:192.0.2.1 ~all"',
            'good.test TXT "v=spf1 ip4:127.0.0.1 -all"',
            '_dmarc.good.test TXT "v=DMARC1; p=reject"',
            'bank.test TXT "v=spf1 ip4:192.0.2.1 -all"',
            '_dmarc.bank.test TXT "v=DMARC1; p=reject"',
            '_dmarc.lax.test TXT "v=DMARC1; p=none"',
        )
        server.fault("temp.test", "servfail", "TXT")
        server.fault("slow.test", "timeout", "TXT")
        yield server


@pytest.fixture(scope="module")
def bank_key(tmp_path_factory: pytest.TempPathFactory, zone: DNSServer) -> bytes:
    """bank.test's real key (selector s1), published; what a genuine sender signs with."""
    path = tmp_path_factory.mktemp("bank") / "s1.pem"
    zone.add(keygen(path, "bank.test", "s1", bits=1024))
    return path.read_bytes()


def bank_signed(key: bytes, message: bytes) -> bytes:
    include = [b"from", b"to", b"subject", b"message-id"]
    return bytes(dkim.sign(message, b"s1", b"bank.test", key, include_headers=include)) + message


# ---- outbound: DKIM signatures and SPF as the receiving side checks them ---------------


@pytest.fixture(scope="module")
def outbound(
    tmp_path_factory: pytest.TempPathFactory, zone: DNSServer
) -> Iterator[tuple[Relayd, MXServer]]:
    root = tmp_path_factory.mktemp("outbound")
    port = free_port("127.0.0.2")
    cert = server_cert_files(root, "mx1.test", "127.0.0.2")
    keydir = root / "relayd" / "dkim"
    tables = "".join(
        f'[[dkim.key]]\ndomain = "{d}"\nselector = "{s}"\nkey_file = "{keydir / f"{d}.{s}.pem"}"\n'
        for d, s, _ in KEYS
    )
    r = Relayd(
        root / "relayd",
        dns_address=zone.address,
        hold_delivery=False,
        extra=f'[delivery]\nport = {port}\nretry = ["1s"]\nconnect_timeout = "3s"\n'
        f'command_timeout = "5s"\n\n{tables}',
    )
    r.add_user("alice@example.com", PASSWORD)
    for domain, selector, kind in KEYS:
        out = r.ctl("--json", "dkim", "keygen", domain, selector, "--type", kind)
        assert out.returncode == 0, out.stderr
        zone.add(json.loads(out.stdout)["record"])
    with MXServer("127.0.0.2", port, cert=cert, hostname="mx1.test") as mx, r:
        r.start()
        yield r, mx
        assert r.stop() == 0


def test_submitted_mail_is_signed_once_and_passes_dkimpy(
    outbound: tuple[Relayd, MXServer], zone: DNSServer
) -> None:
    r, mx = outbound
    message = msg("Alice <alice@example.com>", "dkim-submission")
    r.submit("alice@example.com", PASSWORD, "alice@example.com", ["bob@example.org"], message)
    got = delivered(mx, "dkim-submission")
    [sig] = signatures(got.data)
    assert (sig["d"], sig["s"], sig["a"], sig["c"]) == (
        "example.com",
        "sel1",
        "rsa-sha256",
        "relaxed/relaxed",
    )
    assert sig["h"].lower().split(":").count("from") == 2  # oversigned
    assert dkim.verify(got.data, dnsfunc=dkim_dnsfunc(zone.resolver()))
    # The verdict depends on the content: a changed body no longer verifies.
    assert not dkim.verify(
        got.data.replace(b"Hello.", b"Hello!"), dnsfunc=dkim_dnsfunc(zone.resolver())
    )


def test_relayed_mail_passes_spf_from_relayds_address(
    outbound: tuple[Relayd, MXServer], zone: DNSServer
) -> None:
    r, mx = outbound
    message = msg("alice@example.com", "spf-outbound")
    r.submit("alice@example.com", PASSWORD, "alice@example.com", ["bob@example.org"], message)
    got = delivered(mx, "spf-outbound")
    assert got.peer == "127.0.0.1" and got.mail_from == "alice@example.com"
    zone.add(f'example.com TXT "v=spf1 ip4:{got.peer} -all"')
    resolver = zone.resolver()
    result = check_spf(got.peer, got.helo, got.mail_from, resolver, timeout=TIMEOUT)
    assert (result.result, result.domain) == ("pass", "example.com")
    # The record tells addresses apart: anyone else sending for example.com fails.
    other = check_spf("192.0.2.1", got.helo, got.mail_from, resolver, timeout=TIMEOUT)
    assert other.result == "fail"


def test_relay_network_client_mail_is_signed(
    outbound: tuple[Relayd, MXServer], zone: DNSServer
) -> None:
    r, mx = outbound
    inject(r, "alice@example.com", msg("alice@example.com", "dkim-network"))
    got = delivered(mx, "dkim-network")
    assert [(s["d"], s["s"]) for s in signatures(got.data)] == [("example.com", "sel1")]
    assert dkimpy_verifies(got.data, zone)


def test_from_domain_without_key_is_not_signed(outbound: tuple[Relayd, MXServer]) -> None:
    r, mx = outbound
    # The From: header decides, not the envelope: example.com has a key, nokey.test not.
    # (From a [relay] networks client: an authenticated user may not use carol's From:.)
    inject(r, "alice@example.com", msg("Carol <carol@nokey.test>", "dkim-nokey"))
    # A subdomain needs a key of its own.
    inject(r, "alice@example.com", msg("alice@sub.example.com", "dkim-subdomain"))
    for subject in ("dkim-nokey", "dkim-subdomain"):
        assert signatures(delivered(mx, subject).data) == []


def test_key_rotation_adds_two_signatures_that_both_verify(
    outbound: tuple[Relayd, MXServer], zone: DNSServer
) -> None:
    r, mx = outbound
    inject(r, "ops@rotate.test", msg("ops@rotate.test", "dkim-rotation"))
    got = delivered(mx, "dkim-rotation")
    sigs = signatures(got.data)
    pairs = sorted((sig["d"], sig["s"]) for sig in sigs)
    assert pairs == [("rotate.test", "new"), ("rotate.test", "old")]
    assert all(dkimpy_verifies(got.data, zone, idx) for idx in range(len(sigs)))


def test_ed25519_key_signs_and_verifies(outbound: tuple[Relayd, MXServer], zone: DNSServer) -> None:
    r, mx = outbound
    inject(r, "ops@ed.test", msg("ops@ed.test", "dkim-ed25519"))
    got = delivered(mx, "dkim-ed25519")
    [sig] = signatures(got.data)
    assert (sig["d"], sig["a"]) == ("ed.test", "ed25519-sha256")
    assert dkimpy_verifies(got.data, zone)


# ---- inbound: SPF and DMARC on mail from the Internet -------------------------------------


def test_forged_authentication_results_are_removed_from_submitted_mail(
    outbound: tuple[Relayd, MXServer], zone: DNSServer
) -> None:
    """Our own users' mail too: a downstream filter trusts our authserv-id."""
    r, mx = outbound
    forged = (
        f"Authentication-Results: {HOSTNAME.upper()}.;\r\n\tdkim=pass header.d=bank.test\r\n"
        "Authentication-Results: mx.other.example; spf=pass smtp.mailfrom=x.test\r\n"
    ).encode()
    message = forged + msg("alice@example.com", "forged-ar-submission")
    r.submit("alice@example.com", PASSWORD, "alice@example.com", ["bob@example.org"], message)
    got = delivered(mx, "forged-ar-submission")
    fields = values(email.message_from_bytes(got.data), "Authentication-Results")
    assert fields == ["mx.other.example; spf=pass smtp.mailfrom=x.test"]
    # Signed after the removal: the signature covers what was delivered.
    assert dkimpy_verifies(got.data, zone)


def inbound_relayd(root: Path, zone: DNSServer, extra: str) -> Relayd:
    r = Relayd(root, dns_address=zone.address, extra=INBOUND + extra)
    r.add_user("alice@bad.test", PASSWORD)
    return r


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory, zone: DNSServer) -> Iterator[Relayd]:
    """SPF with its defaults (fail refused, softfail tagged); DMARC p=reject enforced."""
    extra = '\n[dmarc]\non_reject = "reject"\n'
    with inbound_relayd(tmp_path_factory.mktemp("strict"), zone, extra) as r:
        r.start()
        yield r
        assert r.stop() == 0


@pytest.fixture(scope="module")
def tagging(tmp_path_factory: pytest.TempPathFactory, zone: DNSServer) -> Iterator[Relayd]:
    """SPF fail only tagged; DMARC with its default (tag)."""
    extra = '\n[spf]\non_fail = "tag"\n'
    with inbound_relayd(tmp_path_factory.mktemp("tagging"), zone, extra) as r:
        r.start()
        yield r
        assert r.stop() == 0


@pytest.fixture(scope="module")
def spf_off(tmp_path_factory: pytest.TempPathFactory, zone: DNSServer) -> Iterator[Relayd]:
    """SPF off; DMARC p=reject enforced as far as it can be without SPF."""
    extra = '\n[spf]\nenabled = false\n\n[dmarc]\non_reject = "reject"\n'
    with inbound_relayd(tmp_path_factory.mktemp("spf-off"), zone, extra) as r:
        r.start()
        yield r
        assert r.stop() == 0


def test_spf_fail_is_refused_at_mail(strict: Relayd) -> None:
    with connect(strict) as s:
        s.ehlo("client.test")
        code, text = s.mail("mallory@bad.test")
        assert (code, text.split()[0]) == (550, b"5.7.23"), text
        assert s.mail("news@good.test")[0] == 250  # the session goes on


def test_spf_temperror_asks_for_a_retry(strict: Relayd) -> None:
    with connect(strict) as s:
        s.ehlo("client.test")
        code, text = s.mail("someone@temp.test")  # SERVFAIL
        assert (code, text.split()[0]) == (451, b"4.7.24"), text
        started = time.monotonic()
        code, text = s.mail("someone@slow.test")  # no answer at all
        assert (code, text.split()[0]) == (451, b"4.7.24"), text
        assert time.monotonic() - started < 8  # held to [dns] timeout (2s), not longer


def test_spf_softfail_is_accepted_and_tagged(strict: Relayd) -> None:
    qid = inject(strict, "news@soft.test", msg("news@soft.test", "spf-softfail"))
    m = stored(strict, qid)
    [received_spf] = values(m, "Received-SPF")
    assert received_spf.startswith(f"softfail ({HOSTNAME}: ")
    assert 'client-ip=127.0.0.1; envelope-from="news@soft.test";' in received_spf
    assert auth_results(m).startswith(f"{HOSTNAME}; spf=softfail smtp.mailfrom=soft.test;")


def test_trusted_clients_are_not_spf_checked(strict: Relayd, zone: DNSServer) -> None:
    lookups = zone.queries.count(("bad.test", "TXT"))
    # bad.test's record fails 127.0.0.1, yet these are our own users.
    ids = [
        strict.submit(
            "alice@bad.test",
            PASSWORD,
            "alice@bad.test",
            ["carol@elsewhere.test"],
            msg("alice@bad.test", "trusted-submission", "carol@elsewhere.test"),
        )
    ]
    with connect(strict, "inbound") as s:  # AUTH on the inbound listener counts too
        s.ehlo("client.test")
        s.starttls(context=client_context())
        s.ehlo("client.test")
        s.login("alice@bad.test", PASSWORD)
        ids.append(send(s, "alice@bad.test", ["bob@example.org"], msg("alice@bad.test", "t2")))
    with connect(strict, "inbound", source="127.0.0.5") as s:  # in [relay] networks
        s.ehlo("client.test")
        message = msg("app@bad.test", "trusted-network", "carol@elsewhere.test")
        ids.append(send(s, "app@bad.test", ["carol@elsewhere.test"], message))
    assert zone.queries.count(("bad.test", "TXT")) == lookups
    for qid in ids:
        m = stored(strict, qid)
        assert values(m, "Received-SPF") == [] and values(m, "Authentication-Results") == []


def test_dmarc_reject_spoof_is_refused_at_end_of_data(strict: Relayd, bank_key: bytes) -> None:
    before = queued_ids(strict)
    plain = msg("CEO <ceo@bank.test>", "dmarc-spoof")
    # A signature by bank.test's real key, on a body changed after signing.
    tampered = bank_signed(bank_key, msg("CEO <ceo@bank.test>", "dmarc-tampered"))
    tampered = tampered.replace(b"Hello.", b"Wire 10k now.")
    for message in (plain, tampered):
        with connect(strict) as s:
            s.ehlo("client.test")
            assert s.mail("mallory@nowhere.test")[0] == 250  # SPF none
            assert s.rcpt("bob@example.org")[0] == 250
            code, text = s.data(message)
            assert (code, text.split()[0]) == (550, b"5.7.1"), text
    assert queued_ids(strict) == before


def test_dmarc_p_none_failure_is_tagged(strict: Relayd) -> None:
    qid = inject(strict, "mallory@nowhere.test", msg("ceo@lax.test", "dmarc-p-none"))
    results = auth_results(stored(strict, qid))
    assert "spf=none smtp.mailfrom=nowhere.test" in results
    assert "dmarc=fail (p=none) header.from=lax.test" in results


def test_dmarc_pass_with_aligned_spf(strict: Relayd) -> None:
    qid = inject(strict, "news@good.test", msg("CEO <ceo@good.test>", "dmarc-pass-spf"))
    m = stored(strict, qid)
    assert values(m, "Received-SPF")[0].startswith("pass ")
    results = auth_results(m)
    assert results.startswith(f"{HOSTNAME}; spf=pass smtp.mailfrom=good.test;")
    assert "dmarc=pass (p=reject) header.from=good.test" in results


def test_dmarc_pass_with_aligned_dkim(strict: Relayd, bank_key: bytes) -> None:
    signed = bank_signed(bank_key, msg("CEO <ceo@bank.test>", "dmarc-pass-dkim"))
    qid = inject(strict, "mallory@nowhere.test", signed)
    results = auth_results(stored(strict, qid))
    assert "dkim=pass header.d=bank.test header.s=s1" in results
    assert "dmarc=pass (p=reject) header.from=bank.test" in results


def test_forged_authentication_results_are_removed(strict: Relayd) -> None:
    forged = (
        f"Authentication-Results: {HOSTNAME}; spf=pass smtp.mailfrom=lax.test;\r\n"
        " dmarc=pass header.from=lax.test\r\n"
        f"Authentication-Results: {HOSTNAME.upper()}.; dkim=pass header.d=lax.test\r\n"
        f"Authentication-Results: (trust me) {HOSTNAME}; dmarc=pass\r\n"
        "Authentication-Results: mx.other.example; spf=pass smtp.mailfrom=lax.test\r\n"
    ).encode()
    qid = inject(strict, "mallory@nowhere.test", forged + msg("ceo@lax.test", "forged-ar"))
    m = stored(strict, qid)
    fields = values(m, "Authentication-Results")
    assert len(fields) == 2, fields
    assert auth_results(m) == (
        f"{HOSTNAME}; spf=none smtp.mailfrom=nowhere.test; dkim=none; "
        "dmarc=fail (p=none) header.from=lax.test"
    )
    assert "mx.other.example; spf=pass smtp.mailfrom=lax.test" in fields


def test_spf_fail_with_on_fail_tag_is_accepted_and_tagged(tagging: Relayd) -> None:
    qid = inject(tagging, "mallory@bad.test", msg("mallory@bad.test", "spf-tag"))
    m = stored(tagging, qid)
    [received_spf] = values(m, "Received-SPF")
    assert received_spf.startswith(f"fail ({HOSTNAME}: domain of bad.test does not designate")
    assert auth_results(m).startswith(f"{HOSTNAME}; spf=fail smtp.mailfrom=bad.test;")


def test_dmarc_reject_failure_is_tagged_by_default(tagging: Relayd) -> None:
    qid = inject(tagging, "ceo@bank.test", msg("CEO <ceo@bank.test>", "dmarc-tag"))
    results = auth_results(stored(tagging, qid))
    assert "spf=fail smtp.mailfrom=bank.test" in results
    assert "dmarc=fail (p=reject) header.from=bank.test" in results


def test_spf_disabled_checks_nothing(spf_off: Relayd, zone: DNSServer) -> None:
    lookups = [zone.queries.count((name, "TXT")) for name in ("bad.test", "temp.test")]
    ids = [
        inject(spf_off, "mallory@bad.test", msg("mallory@bad.test", "spf-off-fail")),
        inject(spf_off, "someone@temp.test", msg("someone@temp.test", "spf-off-temperror")),
    ]
    assert [zone.queries.count((name, "TXT")) for name in ("bad.test", "temp.test")] == lookups
    for qid in ids:
        m = stored(spf_off, qid)
        assert values(m, "Received-SPF") == []
        assert "spf=" not in auth_results(m)


def test_dmarc_without_spf_tags_instead_of_refusing(spf_off: Relayd) -> None:
    # good.test's mail would pass DMARC on aligned SPF; unchecked, it is not refused.
    qid = inject(spf_off, "news@good.test", msg("CEO <ceo@good.test>", "spf-off-dmarc"))
    results = auth_results(stored(spf_off, qid))
    assert "spf=" not in results and "dmarc=fail (p=reject) header.from=good.test" in results


# ---- rate limits -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rated(tmp_path_factory: pytest.TempPathFactory, zone: DNSServer) -> Iterator[Relayd]:
    r = Relayd(tmp_path_factory.mktemp("rated"), dns_address=zone.address, extra=RATES)
    r.add_user("alice@example.com", PASSWORD)
    with r:
        r.start()
        yield r
        assert r.stop() == 0


def assert_limited(reply: tuple[int, bytes], limit: str) -> None:
    code, text = reply
    assert (code, text.split()[0]) == (450, b"4.7.1"), text
    assert f"rate limit {limit} (2/minute)".encode() in text, text


def test_per_ip_limit_on_the_third_message(rated: Relayd) -> None:
    with connect(rated, source="127.0.0.6") as s:
        s.ehlo("client.test")
        for i in range(2):
            send(s, "news@nowhere.test", ["bob@example.org"], msg("news@nowhere.test", f"ip{i}"))
        assert_limited(s.mail("news@nowhere.test"), "per ip")
    # Another client is counted on its own.
    inject(rated, "news@nowhere.test", msg("news@nowhere.test", "ip-other"), source="127.0.0.10")


def test_rate_limits_apply_to_relay_network_clients(rated: Relayd) -> None:
    with connect(rated, source="127.0.0.7") as s:
        s.ehlo("client.test")
        for i in range(2):
            message = msg("app@example.com", f"net{i}", "carol@elsewhere.test")
            send(s, "app@example.com", ["carol@elsewhere.test"], message)
        assert_limited(s.mail("app@example.com"), "per ip")


def test_per_user_limit_on_submission(rated: Relayd) -> None:
    # Two messages from one address, the third from another: the user is what is counted.
    for i, source in enumerate(("127.0.0.8", "127.0.0.8", "127.0.0.9")):
        with connect(rated, "submissions", source) as s:
            s.ehlo("client.test")
            s.login("alice@example.com", PASSWORD)
            if i < 2:
                message = msg("alice@example.com", f"user{i}", "carol@elsewhere.test")
                send(s, "alice@example.com", ["carol@elsewhere.test"], message)
            else:
                assert_limited(s.mail("alice@example.com"), "per user")


def test_messages_refused_by_spf_are_not_counted(rated: Relayd) -> None:
    with connect(rated, source="127.0.0.11") as s:
        s.ehlo("client.test")
        for _ in range(2):
            code, text = s.mail("mallory@bad.test")
            assert (code, text.split()[0]) == (550, b"5.7.23"), text
        # Nothing was accepted yet, so the limit of two leaves room.
        send(s, "news@nowhere.test", ["bob@example.org"], msg("news@nowhere.test", "uncounted"))
