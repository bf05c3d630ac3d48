"""No backscatter: unknown users are refused at RCPT, bounces to strangers stay small.

The decisions (the recipients file, what a probe answer means, the answer
cache) are tested as plain functions; the rest against a real relayd on
loopback, whose served domains' next hops are loopback SMTP servers found
through the loopback DNS server. The client connects from 127.0.0.1, which
these configs leave out of ``[relay] networks``: it is a stranger.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.dnsserver import DNSServer
from support.mxserver import MXPool, MXServer
from support.ports import free_port
from support.relayd_proc import Relayd

from relayd.address import Address, parse_path
from relayd.config import load_config
from relayd.delivery.reply import Outcome
from relayd.delivery.verify import (
    ACCEPTED_TTL,
    PROBE_TIMEOUT,
    REFUSED_TTL,
    Answer,
    AnswerCache,
    RecipientProber,
    answer_of,
    ttl_of,
)
from relayd.dns import make_resolver
from relayd.policy.recipients import listed_verdict, parse_recipients, probe_verdict

SERVED = '["example.test", "hang.test", "down.test", "listed.test", "open.test"]'
STRANGERS = '["192.0.2.0/24"]'  # anything but loopback: the test client may not relay


def addr(text: str) -> Address:
    rcpt, _ = parse_path(f"<{text}>", allow_null=False)
    assert rcpt is not None
    return rcpt


# ---------------------------------------------------------------------------
# The recipients file, as plain data.

FILE = """\
# staff
Bob@Listed.test
carol@listed.test   # trailing comment
a#b@listed.test
@whole.test
not an address
"""


def test_recipients_file_parses_addresses_domains_and_comments() -> None:
    listed, warnings = parse_recipients(FILE, "recipients")
    assert listed.addresses == {"bob@listed.test", "carol@listed.test", "a#b@listed.test"}
    assert listed.whole_domains == {"whole.test"}
    assert listed.domains == {"listed.test", "whole.test"}
    assert len(warnings) == 1 and warnings[0].startswith("recipients:6: 'not an address'")


def test_listed_verdict_only_restricts_domains_in_the_file() -> None:
    listed, _ = parse_recipients(FILE)
    assert listed_verdict(addr("BOB@listed.test"), listed) is None
    refused = listed_verdict(addr("mallory@listed.test"), listed)
    assert refused is not None and (refused.code, refused.enhanced) == (550, "5.1.1")
    assert listed_verdict(addr("anyone@whole.test"), listed) is None
    assert listed_verdict(addr("anyone@unlisted.test"), listed) is None


def test_probe_answers_map_to_rcpt_replies() -> None:
    assert probe_verdict("accepted", "250 ok") is None
    refused = probe_verdict("refused", "550 5.1.1 no such user\r\n\x1b[31m")
    assert refused is not None and (refused.code, refused.enhanced) == (550, "5.1.1")
    assert "\r" not in refused.text and "\x1b" not in refused.text
    unknown = probe_verdict("unknown", "connect to mx: Connection refused")
    assert unknown is not None and (unknown.code, unknown.enhanced) == (450, "4.1.1")


def test_only_a_permanent_rcpt_refusal_is_a_no_and_only_answers_are_cached() -> None:
    assert answer_of(Outcome.perm("5.1.1", "550 5.1.1 unknown")).result == "refused"
    assert answer_of(Outcome.temp("4.4.1", "connection refused")).result == "unknown"
    assert answer_of(Outcome("sent", "2.1.5", "250 2.1.5 OK")).result == "accepted"
    assert ttl_of(Answer("accepted", "")) == ACCEPTED_TTL == 86400
    assert ttl_of(Answer("refused", "")) == REFUSED_TTL == 3600
    assert ttl_of(Answer("unknown", "")) == 0


def test_answer_cache_is_bounded_lru_and_expires() -> None:
    now = [0.0]
    cache = AnswerCache(1000, clock=lambda: now[0])
    for i in range(100_000):  # an attacker probing many distinct addresses
        cache.put(f"user{i}@example.test", Answer("refused", "550"), REFUSED_TTL)
    assert len(cache) == 1000
    assert cache.get("user0@example.test") is None  # evicted, oldest first
    assert cache.get("user99999@example.test") is not None
    cache.put("keep@example.test", Answer("accepted", "250"), ACCEPTED_TTL)
    cache.get("user99001@example.test")  # recently used: survives the next eviction
    cache.put("new@example.test", Answer("accepted", "250"), ACCEPTED_TTL)
    assert cache.get("user99001@example.test") is not None
    assert cache.get("user99002@example.test") is None
    now[0] = REFUSED_TTL + 1
    assert cache.get("user99999@example.test") is None  # a refusal lasts an hour
    assert cache.get("keep@example.test") is not None  # an acceptance a day


# ---------------------------------------------------------------------------
# verify_recipients against a real relayd and loopback next hops.


@pytest.fixture
def verifying(tmp_path: Path, dns_server: DNSServer, mx_pool: MXPool) -> Iterator[Relayd]:
    """example.test -> mx1 (knows bob), hang.test -> mx3 (hangs), down.test -> nobody."""
    dns_server.add(
        "example.test MX 10 mx1.test",
        "mx1.test A 127.0.0.2",
        "hang.test MX 10 mx3.test",
        "mx3.test A 127.0.0.4",
        "down.test MX 10 mxdown.test",
        "mxdown.test A 127.0.0.9",
    )
    mx_pool[0].reply_for("*", "550 5.1.1 <unknown>: no such user")
    mx_pool[0].reply_for("bob@example.test", "250 2.1.5 OK")
    mx_pool[2].behaviour = "hang_after_greeting"
    r = Relayd(
        tmp_path / "relayd",
        dns_address=dns_server.address,
        hold_delivery=False,
        extra=(
            f"[relay]\ndomains = {SERVED}\nnetworks = {STRANGERS}\nverify_recipients = true\n"
            f"[delivery]\nport = {mx_pool.port}\n"
        ),
    )
    with r:
        r.start()
        yield r


def rcpt_replies(r: Relayd, *rcpts: str) -> list[tuple[int, str]]:
    with r.smtp("inbound", timeout=30) as s:
        s.ehlo("client.test")
        code, reply = s.mail("alice@sender.test")
        assert code == 250, reply
        out = []
        for rcpt in rcpts:
            code, reply = s.rcpt(rcpt)
            out.append((code, reply.decode()))
        return out


def probes_for(mx: MXServer, address: str) -> int:
    return sum(1 for a, _ in list(mx.rcpts) if a.lower() == address.lower())


def test_verify_known_user_250_unknown_550_at_rcpt(verifying: Relayd, mx_pool: MXPool) -> None:
    [known, unknown] = rcpt_replies(verifying, "bob@example.test", "nobody@example.test")
    assert known[0] == 250
    assert unknown[0] == 550 and unknown[1].startswith("5.1.1 "), unknown
    log = verifying.wait_log("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 550 5.1.1")
    assert "<nobody@example.test>: Recipient address rejected:" in log
    assert mx_pool[0].attempts == []  # a probe never sends a message


def test_verify_refused_recipient_queues_nothing(verifying: Relayd) -> None:
    with verifying.smtp("inbound") as s:
        s.ehlo("client.test")
        assert s.mail("alice@sender.test")[0] == 250
        code, reply = s.rcpt("nobody@example.test")
        assert code == 550 and reply.startswith(b"5.1.1"), reply
        code, _ = s.docmd("DATA")
        assert code == 554
    out = verifying.ctl("--json", "queue")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["messages"] == []


def test_verify_answers_are_cached_shared_by_sessions(verifying: Relayd, mx_pool: MXPool) -> None:
    mx = mx_pool[0]
    first = rcpt_replies(verifying, "bob@example.test", "nobody@example.test")
    again = rcpt_replies(verifying, "BOB@example.test", "nobody@example.test", "bob@example.test")
    assert [c for c, _ in first] == [250, 550]
    assert [c for c, _ in again] == [250, 550, 250]
    assert probes_for(mx, "bob@example.test") == 1
    assert probes_for(mx, "nobody@example.test") == 1


def test_next_hop_down_gives_450_4_1_1(verifying: Relayd) -> None:
    [(code, reply)] = rcpt_replies(verifying, "bob@down.test")
    assert code == 450 and reply.startswith("4.1.1 "), reply


def test_hanging_next_hop_holds_rcpt_no_longer_than_the_bound(verifying: Relayd) -> None:
    t0 = time.monotonic()
    [(code, reply)] = rcpt_replies(verifying, "bob@hang.test")
    elapsed = time.monotonic() - t0
    assert code == 450 and reply.startswith("4.1.1 "), reply
    assert elapsed < PROBE_TIMEOUT + 3, elapsed


def test_concurrent_rcpts_for_one_address_share_one_probe(
    tmp_path: Path, dns_server: DNSServer
) -> None:
    """A slow next hop, five sessions asking at once: one probe, and what it said."""
    transcript: list[str] = []

    async def slow_mx(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 slow.test ESMTP\r\n")
        for _ in range(20):
            line = (await asyncio.wait_for(reader.readline(), 20)).decode().strip()
            if not line:
                return
            transcript.append(line)
            verb = line.split(" ")[0].upper()
            if verb == "RCPT":
                await asyncio.sleep(1.0)
                writer.write(b"250 2.1.5 OK\r\n")
            elif verb == "QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"250 slow.test\r\n" if verb == "EHLO" else b"250 2.0.0 OK\r\n")
            await writer.drain()

    port = free_port("127.0.0.6")
    with MXServer("127.0.0.6", port) as mx:
        mx.raw_handler = slow_mx
        dns_server.add("example.test MX 10 slow.test", "slow.test A 127.0.0.6")
        r = Relayd(
            tmp_path / "relayd",
            dns_address=dns_server.address,
            hold_delivery=False,
            extra=(
                f"[relay]\ndomains = {SERVED}\nnetworks = {STRANGERS}\n"
                f'verify_recipients = true\n[delivery]\nport = {port}\ntls = "none"\n'
            ),
        )
        with r:
            r.start()
            results: list[list[tuple[int, str]]] = []
            threads = [
                threading.Thread(
                    target=lambda: results.append(rcpt_replies(r, "dave@example.test"))
                )
                for _ in range(5)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert [res[0][0] for res in results] == [250] * 5
            assert mx.connections == 1
            deadline = time.monotonic() + 5
            while "QUIT" not in transcript and time.monotonic() < deadline:
                time.sleep(0.05)
    assert transcript == [
        "EHLO mail.relayd.test",
        "MAIL FROM:<>",
        "RCPT TO:<dave@example.test>",
        "RSET",
        "QUIT",
    ]


def test_every_accepting_process_verifies_with_its_own_cache(
    tmp_path: Path, dns_server: DNSServer, mx_pool: MXPool
) -> None:
    dns_server.add("example.test MX 10 mx1.test", "mx1.test A 127.0.0.2")
    mx_pool[0].reply_for("*", "550 5.1.1 no such user")
    r = Relayd(
        tmp_path / "relayd",
        dns_address=dns_server.address,
        hold_delivery=False,
        extra=(
            f"[relay]\ndomains = {SERVED}\nnetworks = {STRANGERS}\nverify_recipients = true\n"
            f"[delivery]\nport = {mx_pool.port}\n[server]\nprocesses = 2\n"
        ),
    )
    with r:
        r.start()
        codes = [rcpt_replies(r, "nobody@example.test")[0][0] for _ in range(8)]
    assert codes == [550] * 8
    assert 1 <= probes_for(mx_pool[0], "nobody@example.test") <= 2  # one per process


def test_clients_that_may_relay_are_not_verified(
    tmp_path: Path, dns_server: DNSServer, mx_pool: MXPool
) -> None:
    dns_server.add("example.test MX 10 mx1.test", "mx1.test A 127.0.0.2")
    mx_pool[0].reply_for("*", "550 5.1.1 no such user")
    r = Relayd(
        tmp_path / "relayd",
        dns_address=dns_server.address,
        extra='[relay]\ndomains = ["example.test"]\nverify_recipients = true\n',
    )
    with r:
        r.start()  # 127.0.0.1 is in the default networks
        [(code, _)] = rcpt_replies(r, "nobody@example.test")
        assert code == 250
    assert mx_pool[0].rcpts == []


def test_probes_are_capped_in_number_and_time(tmp_path: Path) -> None:
    """Ten distinct addresses at once against a next hop that never answers."""
    port = free_port("127.0.0.7")
    with MXServer("127.0.0.7", port) as mx:
        mx.behaviour = "hang_after_greeting"
        path = tmp_path / "relayd.toml"
        path.write_text(
            'hostname = "mail.relayd.test"\n[[route]]\ndomain = "example.test"\n'
            f'via = "127.0.0.7:{port}"\ntls = "none"\n'
        )
        config = load_config(path)

        async def attack() -> tuple[list[tuple[str, str]], float]:
            prober = RecipientProber(
                config, make_resolver(config.dns), timeout=2.0, max_running=2, max_pending=4
            )
            t0 = time.monotonic()
            results = await asyncio.gather(
                *(prober.check(f"user{i}@example.test") for i in range(10))
            )
            elapsed = time.monotonic() - t0
            await prober.close()
            assert len(prober.cache) == 0  # "unknown" is never cached
            return list(results), elapsed

        results, elapsed = asyncio.run(attack())
        assert mx.connections == 2  # max_running; the other two pending timed out waiting
    assert all(result == "unknown" for result, _ in results)
    busy = [detail for _, detail in results if "too many recipient checks" in detail]
    assert len(busy) == 6  # over max_pending: answered at once, no probe
    assert elapsed < 2.0 + 1.5, elapsed


# ---------------------------------------------------------------------------
# recipients_file against a real relayd.


@pytest.fixture
def listing(tmp_path: Path) -> Iterator[tuple[Relayd, Path]]:
    path = tmp_path / "recipients"
    path.write_text("# who may get mail\nbob@listed.test\n")
    r = Relayd(
        tmp_path / "relayd",
        extra=(
            f'[relay]\ndomains = {SERVED}\nnetworks = {STRANGERS}\nrecipients_file = "{path}"\n'
        ),
    )
    with r:
        r.start()
        yield r, path


def test_recipients_file_listed_250_unlisted_550(listing: tuple[Relayd, Path]) -> None:
    r, _ = listing
    replies = rcpt_replies(r, "Bob@listed.test", "mallory@listed.test", "anyone@open.test")
    assert [c for c, _ in replies] == [250, 550, 250]
    assert replies[1][1].startswith("5.1.1 "), replies
    r.wait_log("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 550 5.1.1 <mallory@listed.test>")


def test_recipients_file_edits_apply_without_reload(listing: tuple[Relayd, Path]) -> None:
    r, path = listing
    assert [c for c, _ in rcpt_replies(r, "carol@listed.test")] == [550]
    path.write_text("bob@listed.test\n# carol joined\ncarol@listed.test\n")
    assert [c for c, _ in rcpt_replies(r, "carol@listed.test", "bob@listed.test")] == [250, 250]
    tmp = path.with_suffix(".new")  # an editor that writes a new file and renames it
    tmp.write_text("carol@listed.test\n")
    tmp.replace(path)
    assert [c for c, _ in rcpt_replies(r, "carol@listed.test", "bob@listed.test")] == [250, 550]


def test_missing_recipients_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    r = Relayd(tmp_path / "relayd", extra=f'[relay]\nrecipients_file = "{missing}"\n')
    with r:
        out = subprocess.run(
            [sys.executable, "-m", "relayd.cli", "--config", str(r.config_path), "--check-config"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert out.returncode == 1
    assert "[relay] recipients_file" in out.stderr and str(missing) in out.stderr
    assert "create it" in out.stderr, out.stderr


# ---------------------------------------------------------------------------
# A bounce to a stranger: headers capped, body never.

MARKER = b"BODY-MARKER-7f3a"


def test_bounce_to_stranger_carries_at_most_16kb_of_headers_and_no_body(
    tmp_path: Path, dns_server: DNSServer, mx_pool: MXPool
) -> None:
    """example.test's next hop refuses bob after DATA was accepted: relayd must bounce."""
    dns_server.add(
        "example.test MX 10 mx1.test",
        "mx1.test A 127.0.0.2",
        "sender.test MX 10 mx2.test",
        "mx2.test A 127.0.0.3",
    )
    mx_pool[0].reply_for("bob@example.test", "550 5.1.1 no such user")
    filler = b"".join(b"X-Filler-%03d: " % i + b"x" * 380 + b"\r\n" for i in range(110))
    message = (
        b"From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: big headers\r\n"
        + filler
        + b"\r\nHello.\r\n"
        + MARKER
        + b"\r\n"
    )
    assert len(message.split(b"\r\n\r\n")[0]) > 40_000
    r = Relayd(
        tmp_path / "relayd",
        dns_address=dns_server.address,
        hold_delivery=False,
        extra=(
            f"[relay]\ndomains = {SERVED}\nnetworks = {STRANGERS}\n"
            f'[delivery]\nport = {mx_pool.port}\nretry = ["1s"]\n'
        ),
    )
    with r:
        r.start()
        with r.smtp("inbound") as s:
            s.ehlo("client.test")
            s.sendmail("alice@sender.test", ["bob@example.test"], message)
        [dsn] = mx_pool[1].wait_for_messages(1, timeout=30)
    assert dsn.mail_from in ("", "<>")  # the null sender
    assert dsn.rcpt_tos == ["alice@sender.test"]
    assert MARKER not in dsn.data
    parsed = email.message_from_bytes(dsn.data, policy=email.policy.default)
    [headers] = [p for p in parsed.walk() if p.get_content_type() == "text/rfc822-headers"]
    returned = headers.get_payload(decode=True)
    assert isinstance(returned, bytes)
    assert 0 < len(returned) <= 16_000, len(returned)
    assert returned.startswith(b"Received: ") or b"Subject: big headers" in returned
