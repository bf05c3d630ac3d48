"""SPEC section 8, in process: next hops that lie, flood or are relayd itself.

The delivery agent runs in the test's event loop against servers on
loopback (MXServer with a raw handler from support.hostile) and the
loopback DNS server. Every wait is bounded: asyncio.run is wrapped in a
timeout and the client's own timeouts are short.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from support.certs import ca_file, server_cert_files
from support.dnsserver import DNSServer
from support.hostile import Hostile
from support.mxserver import MXServer
from support.ports import free_port

from relayd.config import Config, DeliveryConfig, DNSConfig, HostPort, Route
from relayd.delivery import lmtp
from relayd.delivery.agent import DeliveryAgent
from relayd.delivery.client import default_tls_context
from relayd.delivery.reply import MAX_STORED_REPLY, Outcome, clip_reply
from relayd.dns import make_resolver
from relayd.spool.model import (
    HISTORY_BUDGET,
    Attempt,
    Envelope,
    Recipient,
    trim_history,
)

T = TypeVar("T")
MESSAGE = b"From: a@origin.test\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"
ME = "relay.origin.test"


def run(coro: Awaitable[T], timeout: float = 30.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    with DNSServer("127.0.0.1") as server:
        yield server


def config(dns_server: DNSServer, port: int, *routes: Route, tls: str = "opportunistic") -> Config:
    return Config(
        hostname=ME,
        routes=routes,
        delivery=DeliveryConfig(
            port=port,
            tls=tls,  # type: ignore[arg-type]
            connect_timeout=2.0,
            command_timeout=3.0,
        ),
        dns=DNSConfig(nameservers=(HostPort("127.0.0.1", dns_server.port),), timeout=0.5),
    )


def deliver(cfg: Config, rcpts: list[str], ca: Path | None = None) -> list[Attempt]:
    def factory(verify: bool, ca_path: Path | None) -> ssl.SSLContext:
        return default_tls_context(verify, ca_path or ca)

    async def go() -> list[Attempt]:
        agent = DeliveryAgent(cfg, make_resolver(cfg.dns), tls_context_factory=factory)
        try:
            env = Envelope("Q1", "alice@origin.test", [Recipient(r) for r in rcpts], time.time())
            return await agent.deliver(env, MESSAGE, rcpts)
        finally:
            await agent.close()

    return run(go())


def two_mx(dns_server: DNSServer, domain: str = "example.test") -> int:
    dns_server.add(
        f"{domain} MX 10 mx1.test",
        f"{domain} MX 20 mx2.test",
        "mx1.test A 127.0.0.2",
        "mx2.test A 127.0.0.3",
    )
    return free_port("127.0.0.2", "127.0.0.3")


INJECTED = b"250 2.0.0 fake\r\n250 2.1.0 fake\r\n250 2.1.5 fake\r\n354 fake\r\n250 2.0.0 fake\r\n"


# --- STARTTLS response injection ---------------------------------------------------------


@pytest.mark.parametrize("tls", ["opportunistic", "required"])
def test_bytes_after_starttls_220_drop_the_session(
    dns_server: DNSServer, tmp_path: Path, tls: str
) -> None:
    """Fake 250s in the same segment as the 220: never read as replies inside TLS."""
    port = two_mx(dns_server)
    cert = server_cert_files(tmp_path, "mx1.test", "mx2.test")
    hostile = Hostile(cert=cert, inject=INJECTED)
    with MXServer("127.0.0.2", port) as mx1, MXServer("127.0.0.3", port) as mx2:
        mx1.raw_handler = mx2.raw_handler = hostile
        [a] = deliver(config(dns_server, port, tls=tls), ["bob@example.test"])
    assert a.status == "deferred" and a.dsn == "4.7.5", a
    assert "STARTTLS injection" in a.reply
    assert hostile.sessions == 2  # both MX tried, each once: no clear-text retry
    assert hostile.saw("MAIL") == [] and hostile.messages == 0
    assert a.tls_policy == tls and not a.tls_verified


def test_injection_at_one_mx_moves_to_the_next(dns_server: DNSServer, tmp_path: Path) -> None:
    port = two_mx(dns_server)
    cert = server_cert_files(tmp_path, "mx1.test", "mx2.test")
    with MXServer("127.0.0.2", port) as mx1, MXServer("127.0.0.3", port, cert=cert) as mx2:
        mx1.raw_handler = Hostile(cert=cert, inject=INJECTED)
        [a] = deliver(config(dns_server, port), ["bob@example.test"])
        assert a.status == "sent" and a.address == "127.0.0.3" and a.tls is not None
        [m] = mx2.messages
        assert m.tls


def test_unsolicited_reply_before_a_command_is_not_its_answer(dns_server: DNSServer) -> None:
    """Without PIPELINING a server speaks when spoken to: a 250 sent early is a lie."""
    port = two_mx(dns_server)
    early = Hostile(after_greeting=b"250 2.0.0 early\r\n", pipelining=False)
    with MXServer("127.0.0.2", port) as mx1, MXServer("127.0.0.3", port) as mx2:
        mx1.raw_handler = mx2.raw_handler = early
        [a] = deliver(config(dns_server, port), ["bob@example.test"])
    assert a.status == "deferred" and a.dsn == "4.5.0"
    assert "unexpected data" in a.reply
    assert early.saw("EHLO") == []


# --- replies as untrusted data ------------------------------------------------------------


def binary_reply(code: str, lines: int, width: int) -> bytes:
    body = (b"\x00\x1b[2J\xff" * (width // 7 + 1))[:width]
    out = [code.encode() + b"-" + body + b"\r\n" for _ in range(lines - 1)]
    return b"".join(out) + code.encode() + b" " + body + b"\r\n"


def test_a_big_binary_reply_is_cut_and_escaped(dns_server: DNSServer) -> None:
    """90 lines of 600 bytes with NUL, ESC and 0xff: within the reader's bounds, kept at 1 KB."""
    port = two_mx(dns_server)
    rcpts = [f"u{i}@example.test" for i in range(20)]
    server = Hostile(rcpt_reply=lambda i, _: binary_reply("550", 90, 600))
    with MXServer("127.0.0.2", port) as mx1:
        mx1.raw_handler = server
        attempts = deliver(config(dns_server, port), rcpts)
    assert sorted(r for a in attempts for r in a.recipients) == sorted(rcpts)
    for a in attempts:
        assert a.status == "failed" and a.dsn == "5.0.0"
        assert len(a.reply) <= MAX_STORED_REPLY
        assert a.reply.isascii() and a.reply.isprintable()
        assert "\\x00\\x1b[2J\\xff" in a.reply


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(binary_reply("550", 1, 5000), id="line-over-4KB"),
        pytest.param(binary_reply("550", 101, 10), id="101-lines"),
        pytest.param(binary_reply("550", 100, 1000), id="over-64KB"),
        pytest.param(binary_reply("550", 1000, 1200), id="1.2MB"),
    ],
)
def test_replies_past_the_bounds_are_protocol_errors(dns_server: DNSServer, reply: bytes) -> None:
    port = two_mx(dns_server)
    rcpts = [f"u{i}@example.test" for i in range(20)]
    server = Hostile(rcpt_reply=lambda i, _: reply)
    with MXServer("127.0.0.2", port) as mx1:
        mx1.raw_handler = server
        attempts = deliver(config(dns_server, port), rcpts)
    [a] = attempts
    assert a.status == "deferred" and a.dsn == "4.5.0", a
    assert "malformed reply" in a.reply or "reply too long" in a.reply
    assert len(a.reply) <= MAX_STORED_REPLY


def test_clip_reply() -> None:
    assert clip_reply("250 ok") == "250 ok"
    long = clip_reply("x" * 5000)
    assert len(long) == MAX_STORED_REPLY and long.endswith("...[cut]")
    escaped = clip_reply("\x1b" * 2000)
    assert len(escaped) <= MAX_STORED_REPLY and escaped.endswith("\\x1b...[cut]")
    assert clip_reply(long) == long and clip_reply(escaped) == escaped
    assert Outcome.perm("5.0.0", "a\r\nb\x00").reply == "a\\r\\nb\\x00"


def _record(number: int, i: int, reply: str = "450 x") -> Attempt:
    return Attempt(
        float(number), [f"u{i}@example.test"], "mx", "127.0.0.2", 25, None, reply, "4.0.0",
        "deferred", 0.1, number=number,
    )  # fmt: skip


def test_history_keeps_the_first_attempt_and_the_last_20() -> None:
    history: list[Attempt] = []
    for n in range(1, 51):
        history = trim_history([*history, *(_record(n, i) for i in range(3))])
    numbers = sorted({a.number for a in history})
    assert numbers == [1, *range(31, 51)]
    assert len(history) == 21 * 3


def test_history_stays_within_its_budget() -> None:
    """100 recipients, each refused in 1 KB of its own words, 30 times."""
    history: list[Attempt] = []
    for n in range(1, 31):
        history = trim_history([*history, *(_record(n, i, "4" * 1024) for i in range(100))])
    size = sum(len(a.reply) + a.reply.count("\\") + 300 for a in history)
    assert size <= HISTORY_BUDGET
    numbers = sorted({a.number for a in history})
    assert numbers[0] == 1 and numbers[-1] == 30


# --- mail that loops back to myself -------------------------------------------------------


@pytest.mark.parametrize("where", ["banner", "ehlo"])
def test_next_hop_with_my_hostname_fails_at_once(dns_server: DNSServer, where: str) -> None:
    port = two_mx(dns_server)
    me = Hostile(banner=ME.upper()) if where == "banner" else Hostile(ehlo_name=ME + ".")
    other = Hostile()
    with MXServer("127.0.0.2", port) as mx1, MXServer("127.0.0.3", port) as mx2:
        mx1.raw_handler, mx2.raw_handler = me, other
        [a] = deliver(config(dns_server, port), ["a@example.test", "b@example.test"])
    assert a.status == "failed" and a.dsn == "5.4.6"
    assert a.reply == "mail for example.test loops back to myself"
    assert a.recipients == ["a@example.test", "b@example.test"]
    assert other.sessions == 0  # no other MX is tried
    assert me.saw("MAIL") == []


def test_routes_are_exempt_from_the_loop_check(dns_server: DNSServer) -> None:
    port = free_port("127.0.0.5")
    route = Route("example.test", HostPort("127.0.0.5", port), tls="none")
    me = Hostile(banner=ME)
    with MXServer("127.0.0.5", port) as smart:
        smart.raw_handler = me
        [a] = deliver(config(dns_server, 25, route), ["a@example.test"])
    assert a.status == "failed" and a.dsn == "5.5.1"  # the hostile server's DATA refusal
    assert me.saw("RCPT")
    assert a.tls_policy == "route"


# --- the TLS policy on each attempt ----------------------------------------------------------


def test_attempts_name_their_tls_policy(dns_server: DNSServer, tmp_path: Path) -> None:
    dns_server.add("example.test MX 10 mx1.test", "mx1.test A 127.0.0.2")
    port = free_port("127.0.0.2")
    cert = server_cert_files(tmp_path, "mx1.test")
    ca = ca_file(tmp_path)
    with MXServer("127.0.0.2", port, cert=cert, hostname="mx1.test"):
        [a] = deliver(config(dns_server, port), ["a@example.test"], ca)
        assert (a.status, a.tls_policy, a.tls_verified) == ("sent", "opportunistic", False)
        [b] = deliver(config(dns_server, port, tls="verify"), ["a@example.test"], ca)
        assert (b.status, b.tls_policy, b.tls_verified) == ("sent", "verify", True)
        route = Route("example.test", HostPort("mx1.test", port), ca_file=ca)
        [c] = deliver(config(dns_server, port, route), ["a@example.test"], ca)
        assert (c.status, c.tls_policy, c.tls_verified) == ("sent", "route", True)
    with MXServer("127.0.0.2", port):  # no STARTTLS offered
        [d] = deliver(config(dns_server, port, tls="none"), ["a@example.test"], ca)
        assert (d.status, d.tls_policy, d.tls_verified, d.tls) == ("sent", "none", False, None)


# --- LMTP: the same rule for unsolicited replies ---------------------------------------------


@pytest.mark.parametrize("early", ["after the greeting", "after 354"])
def test_lmtp_unsolicited_reply_is_not_taken(early: str) -> None:
    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        extra = b"250 2.0.0 early\r\n"
        writer.write(b"220 lmtp.test LMTP\r\n" + (extra if early == "after the greeting" else b""))
        for _ in range(20):
            line = await asyncio.wait_for(reader.readline(), 5)
            if not line:
                break
            if line.upper().startswith(b"DATA"):
                writer.write(b"354 go\r\n" + (extra if early == "after 354" else b""))
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    async def go() -> dict[str, Outcome]:
        srv = await asyncio.start_server(server, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            target = lmtp.Target(address=HostPort("127.0.0.1", port))
            return await lmtp.deliver(
                target, ME, "a@origin.test", ["b@example.test"], MESSAGE, command_timeout=3.0
            )
        finally:
            srv.close()

    [outcome] = run(go()).values()
    assert outcome.status == "deferred" and "unexpected data" in outcome.reply
