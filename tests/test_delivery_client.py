"""Outbound delivery against real SMTP servers and a real DNS server on loopback.

The MX hosts are MXServer instances on 127.0.0.2, .3, ... sharing one port,
which ``[delivery] port`` points at; DNS answers come from DNSServer. Every
wait is bounded: asyncio.run is wrapped in a timeout and the client's own
timeouts are short.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from support.certs import ca_file, server_cert_files
from support.dnsserver import DNSServer
from support.mxserver import MXPool, MXServer
from support.ports import free_port

from relayd.config import Config, DeliveryConfig, DNSConfig, HostPort, Route
from relayd.delivery.agent import DeliveryAgent
from relayd.delivery.client import (
    TLSPolicy,
    default_tls_context,
    encode_data,
    load_credentials,
    needs_smtputf8,
    tls_policy,
)
from relayd.delivery.reply import DeliveryError
from relayd.dns import make_resolver
from relayd.spool.model import Attempt, Envelope, Recipient

T = TypeVar("T")
MESSAGE = b"From: a@origin.test\r\nTo: b@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"


def run(coro: Awaitable[T], timeout: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    with DNSServer("127.0.0.1") as server:
        yield server


@pytest.fixture
def pool() -> Iterator[MXPool]:
    with MXPool(2) as mx_pool:
        yield mx_pool


def config(
    dns_server: DNSServer,
    port: int,
    *routes: Route,
    tls: str = "opportunistic",
    command_timeout: float = 3.0,
) -> Config:
    return Config(
        hostname="relay.origin.test",
        routes=routes,
        delivery=DeliveryConfig(
            port=port,
            tls=tls,  # type: ignore[arg-type]
            connect_timeout=2.0,
            command_timeout=command_timeout,
        ),
        dns=DNSConfig(nameservers=(HostPort("127.0.0.1", dns_server.port),), timeout=0.5),
    )


def envelope(sender: str = "alice@origin.test", *rcpts: str) -> Envelope:
    return Envelope("Q1", sender, [Recipient(r) for r in rcpts], arrival_time=time.time())


def deliver(
    cfg: Config,
    rcpts: list[str],
    *,
    sender: str = "alice@origin.test",
    data: bytes = MESSAGE,
    factory: Callable[[bool, Path | None], ssl.SSLContext] | None = None,
    **env: Any,
) -> list[Attempt]:
    async def go() -> list[Attempt]:
        agent = DeliveryAgent(cfg, make_resolver(cfg.dns), tls_context_factory=factory)
        try:
            env_ = envelope(sender, *rcpts)
            for key, value in env.items():
                setattr(env_, key, value)
            return await agent.deliver(env_, data, rcpts)
        finally:
            await agent.close()

    return run(go())


def by_rcpt(attempts: list[Attempt]) -> dict[str, Attempt]:
    return {r: a for a in attempts for r in a.recipients}


# --- pure helpers -------------------------------------------------------------


def test_encode_data_dot_stuffs_and_terminates() -> None:
    assert encode_data(b"a\r\n.b\r\n..c\r\n") == b"a\r\n..b\r\n...c\r\n.\r\n"
    assert encode_data(b".x") == b"..x\r\n.\r\n"
    assert encode_data(b"bare\nlf\n") == b"bare\r\nlf\r\n.\r\n"
    assert encode_data(b"") == b".\r\n"


def test_tls_policy_mapping(tmp_path: Path) -> None:
    d = DeliveryConfig
    assert tls_policy(d(tls="opportunistic"), None) == TLSPolicy("opportunistic")
    assert tls_policy(d(tls="required"), None) == TLSPolicy("required")
    assert tls_policy(d(tls="verify"), None) == TLSPolicy("required", verify=True)
    assert tls_policy(d(tls="none"), None) == TLSPolicy("none")
    ca = tmp_path / "ca.pem"
    route = Route("*", HostPort("h", 25), tls="implicit", tls_verify=False, ca_file=ca)
    assert tls_policy(d(tls="none"), route) == TLSPolicy("implicit", False, ca)
    assert tls_policy(d(), Route("*", HostPort("h", 25))) == TLSPolicy("required", True)
    assert tls_policy(d(), Route("*", HostPort("h", 25), tls="none")) == TLSPolicy("none")


def test_credentials_read_first_line(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("  s3cret \nignored\n")
    route = Route("*", HostPort("h", 25), username="u", password_file=pw)
    assert load_credentials(route) == ("u", "s3cret")
    assert load_credentials(Route("*", HostPort("h", 25))) is None
    missing = Route("*", HostPort("h", 25), username="u", password_file=tmp_path / "nope")
    with pytest.raises(DeliveryError) as err:
        load_credentials(missing)
    assert not err.value.permanent and err.value.enhanced == "4.3.5"


def test_needs_smtputf8() -> None:
    assert not needs_smtputf8("", ["a@b.test"])
    assert needs_smtputf8("", ["jörg@b.test"])
    assert needs_smtputf8("ü@x.test", ["a@b.test"])


# --- next hop choice ----------------------------------------------------------------


def test_sent_with_250(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("example.test"))
    [a] = deliver(config(dns_server, pool.port), ["bob@example.test"])
    assert a.status == "sent" and a.dsn == "2.0.0" and a.reply.startswith("250")
    assert a.recipients == ["bob@example.test"]
    assert a.address in pool.hosts and a.port == pool.port and a.host.endswith(".test")
    assert a.duration >= 0 and a.time > 0
    [m] = pool.messages
    assert m.mail_from == "alice@origin.test" and m.rcpt_tos == ["bob@example.test"]
    assert m.data == MESSAGE and m.helo == "relay.origin.test"
    assert f"SIZE={len(MESSAGE)}" in m.mail_options


def test_lowest_preference_first_then_fallback_on_refused_connection(
    dns_server: DNSServer, pool: MXPool
) -> None:
    dns_server.add(
        "example.test MX 5 dead.example.test",
        "dead.example.test A 127.0.0.250",  # nothing listens there
        *pool.mx_records("example.test", [10, 20]),
    )
    [a] = deliver(config(dns_server, pool.port), ["bob@example.test"])
    assert a.status == "sent" and a.host == "mx1.test" and a.address == "127.0.0.2"
    assert pool[1].connections == 0


def test_421_greeting_moves_to_next_mx(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("example.test", [10, 20]))
    pool[0].greeting = "421 4.3.2 too busy"
    [a] = deliver(config(dns_server, pool.port), ["bob@example.test"])
    assert a.status == "sent" and a.host == "mx2.test"
    assert pool[0].connections == 1 and len(pool[1].messages) == 1


def test_every_mx_refusing_defers_with_last_reply(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("example.test", [10, 20]))
    pool[0].greeting = "554 5.7.1 no thanks"
    pool[1].greeting = "421 4.3.2 too busy"
    [a] = deliver(config(dns_server, pool.port), ["bob@example.test"])
    assert a.status == "deferred" and a.host == "mx2.test"
    assert "421 4.3.2 too busy" in a.reply and a.dsn == "4.3.2"


def test_5xx_greeting_from_every_mx_fails(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("example.test"))
    for server in pool:
        server.greeting = "554 5.7.1 no thanks"
    [a] = deliver(config(dns_server, pool.port), ["bob@example.test"])
    assert a.status == "failed" and a.dsn == "5.7.1" and "554 5.7.1 no thanks" in a.reply


def test_implicit_mx(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add("plain.test A 127.0.0.3")
    [a] = deliver(config(dns_server, pool.port), ["bob@plain.test"])
    assert a.status == "sent" and a.host == "plain.test" and a.address == "127.0.0.3"
    assert len(pool["127.0.0.3"].messages) == 1


def test_null_mx_fails_without_connecting(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add("nomail.test MX 0 .", "nomail.test A 127.0.0.2")
    [a] = deliver(config(dns_server, pool.port), ["bob@nomail.test"])
    assert a.status == "failed" and a.dsn == "5.1.10"
    assert pool.connections == 0


def test_nxdomain_fails(dns_server: DNSServer, pool: MXPool) -> None:
    [a] = deliver(config(dns_server, pool.port), ["bob@nowhere.test"])
    assert a.status == "failed" and a.dsn == "5.1.2" and a.address == ""


@pytest.mark.parametrize("kind", ["servfail", "timeout"])
def test_dns_trouble_defers(dns_server: DNSServer, pool: MXPool, kind: str) -> None:
    dns_server.fault("example.test", kind)
    [a] = deliver(config(dns_server, pool.port), ["bob@example.test"])
    assert a.status == "deferred" and a.dsn == "4.4.3"
    assert pool.connections == 0


# --- replies ----------------------------------------------------------------------


def test_451_defers_with_reply(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("example.test"))
    for server in pool:
        server.reply_for("bob@example.test", "451 4.7.1 greylisted, come back later")
    [a] = deliver(config(dns_server, pool.port), ["bob@example.test"])
    assert a.status == "deferred" and a.dsn == "4.7.1"
    assert a.reply == "451 4.7.1 greylisted, come back later"
    assert pool.messages == []


def test_550_fails_with_reply_quoted(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("example.test"))
    for server in pool:
        server.reply_for("bob@example.test", "550 5.1.1 <bob@example.test>: no such user")
    [a] = deliver(config(dns_server, pool.port), ["bob@example.test"])
    assert a.status == "failed" and a.dsn == "5.1.1"
    assert a.reply == "550 5.1.1 <bob@example.test>: no such user"


def test_mixed_recipient_replies_in_one_session(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("example.test", [10, 20]))
    mx = pool[0]
    mx.reply_for("later@example.test", "451 4.2.0 mailbox busy")
    mx.reply_for("gone@example.test", "550 5.1.1 no such user")
    rcpts = ["ok@example.test", "later@example.test", "gone@example.test", "ok2@example.test"]
    attempts = deliver(config(dns_server, pool.port), rcpts)
    assert len(attempts) == 3
    got = by_rcpt(attempts)
    assert got["ok@example.test"] is got["ok2@example.test"]
    assert got["ok@example.test"].status == "sent"
    assert got["later@example.test"].status == "deferred"
    assert got["later@example.test"].reply == "451 4.2.0 mailbox busy"
    assert got["gone@example.test"].status == "failed"
    assert mx.connections == 1 and pool[1].connections == 0
    [m] = mx.messages
    assert m.rcpt_tos == ["ok@example.test", "ok2@example.test"]


def test_end_of_data_reply_applies_to_all(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("example.test"))
    for server in pool:
        server.data_reply("554 5.7.1 spam detected")
    attempts = deliver(config(dns_server, pool.port), ["a@example.test", "b@example.test"])
    [a] = attempts
    assert a.status == "failed" and a.recipients == ["a@example.test", "b@example.test"]
    assert a.reply == "554 5.7.1 spam detected"


def test_mail_from_refused_applies_to_all(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("example.test"))
    for server in pool:
        server.mail_reply("451 4.3.0 try later")
    [a] = deliver(config(dns_server, pool.port), ["a@example.test", "b@example.test"])
    assert a.status == "deferred" and a.dsn == "4.3.0" and len(a.recipients) == 2


def test_null_sender(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("example.test"))
    [a] = deliver(config(dns_server, pool.port), ["bob@example.test"], sender="")
    assert a.status == "sent"
    [m] = pool.messages
    assert m.mail_from in ("", "<>")


def test_two_domains_sharing_mx_share_one_transaction(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("one.test"), *pool.mx_records("two.test")[:2])
    attempts = deliver(config(dns_server, pool.port), ["a@one.test", "b@two.test"])
    assert [a.status for a in attempts] == ["sent"]
    [m] = pool.messages
    assert sorted(m.rcpt_tos) == ["a@one.test", "b@two.test"]


# --- broken servers ---------------------------------------------------------------


def test_drop_after_data_defers(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("example.test"))
    for server in pool:
        server.behaviour = "drop_after_data"
    [a] = deliver(config(dns_server, pool.port), ["bob@example.test"])
    assert a.status == "deferred" and a.dsn.startswith("4.")
    assert "lost connection" in a.reply


def test_hang_at_data_end_defers_after_command_timeout(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("example.test"))
    for server in pool:
        server.behaviour = "hang_at_data_end"
    t0 = time.monotonic()
    [a] = deliver(config(dns_server, pool.port, command_timeout=0.5), ["bob@example.test"])
    assert a.status == "deferred" and "timed out" in a.reply
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("behaviour", ["hang_after_greeting", "no_greeting"])
def test_silent_server_moves_on_after_command_timeout(
    dns_server: DNSServer, pool: MXPool, behaviour: str
) -> None:
    dns_server.add(*pool.mx_records("example.test", [10, 20]))
    pool[0].behaviour = behaviour
    [a] = deliver(config(dns_server, pool.port, command_timeout=0.5), ["bob@example.test"])
    assert a.status == "sent" and a.host == "mx2.test"
    pool[1].behaviour = behaviour
    [b] = deliver(config(dns_server, pool.port, command_timeout=0.5), ["bob@example.test"])
    assert b.status == "deferred" and "timed out" in b.reply


# --- TLS ----------------------------------------------------------------------------


@pytest.fixture
def tls_pool(tmp_path: Path) -> Iterator[MXPool]:
    with MXPool(2, cert=server_cert_files(tmp_path, "mx1.test", "mx2.test")) as mx_pool:
        yield mx_pool


def test_opportunistic_starttls_used_when_offered(dns_server: DNSServer, tls_pool: MXPool) -> None:
    dns_server.add(*tls_pool.mx_records("example.test"))
    [a] = deliver(config(dns_server, tls_pool.port), ["bob@example.test"])
    assert a.status == "sent" and a.tls is not None and a.tls.startswith("TLSv1")
    [m] = tls_pool.messages
    assert m.tls


def test_opportunistic_clear_when_not_offered(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("example.test"))
    [a] = deliver(config(dns_server, pool.port), ["bob@example.test"])
    assert a.status == "sent" and a.tls is None
    assert not pool.messages[0].tls


def test_opportunistic_retries_in_clear_after_failed_handshake(
    dns_server: DNSServer, tls_pool: MXPool
) -> None:
    dns_server.add(*tls_pool.mx_records("example.test"))

    def refusing(verify: bool, ca: Path | None) -> ssl.SSLContext:
        ctx = default_tls_context(verify, ca)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("aNULL")  # nothing the server will agree to
        return ctx

    [a] = deliver(config(dns_server, tls_pool.port), ["bob@example.test"], factory=refusing)
    assert a.status == "sent" and a.tls is None
    [m] = tls_pool.messages
    assert not m.tls
    assert tls_pool.connections == 2  # the failed handshake, then clear text


def test_required_refuses_clear_text(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("example.test"))
    [a] = deliver(config(dns_server, pool.port, tls="required"), ["bob@example.test"])
    assert a.status == "deferred" and a.dsn.startswith("4.7.")
    assert pool.messages == [] and pool[0].rcpts == []


def test_required_accepts_any_certificate(dns_server: DNSServer, tmp_path: Path) -> None:
    cert = server_cert_files(tmp_path, "somebody-else.test")
    with MXPool(1, cert=cert) as p:
        dns_server.add(*p.mx_records("example.test"))
        [a] = deliver(config(dns_server, p.port, tls="required"), ["bob@example.test"])
        assert a.status == "sent" and a.tls is not None


def test_verify_checks_the_mx_name(dns_server: DNSServer, tmp_path: Path) -> None:
    ca = ca_file(tmp_path)

    def with_test_ca(verify: bool, ca_path: Path | None) -> ssl.SSLContext:
        return default_tls_context(verify, ca_path or ca)

    dns_server.add("example.test MX 10 mx1.test", "mx1.test A 127.0.0.2")
    wrong = server_cert_files(tmp_path, "wrong.test")
    port = free_port("127.0.0.2")
    cfg = config(dns_server, port, tls="verify")
    with MXServer("127.0.0.2", port, cert=wrong, hostname="mx1.test") as mx:
        [a] = deliver(cfg, ["bob@example.test"], factory=with_test_ca)
        assert a.status == "deferred" and a.dsn == "4.7.5"
        assert "certificate" in a.reply and mx.messages == []
    right = server_cert_files(tmp_path, "mx1.test")
    with MXServer("127.0.0.2", port, cert=right, hostname="mx1.test") as mx:
        [b] = deliver(cfg, ["bob@example.test"], factory=with_test_ca)
        assert b.status == "sent" and b.tls is not None
        assert mx.messages[0].tls


# --- routes ---------------------------------------------------------------------------


def _password(tmp_path: Path) -> Path:
    pw = tmp_path / "smarthost.pw"
    pw.write_text("s3cret\n")
    return pw


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_route_auth_over_tls(dns_server: DNSServer, tmp_path: Path, mode: str) -> None:
    cert = server_cert_files(tmp_path, "127.0.0.5")
    port = free_port("127.0.0.5")
    route = Route(
        "*",
        HostPort("127.0.0.5", port),
        username="relayuser",
        password_file=_password(tmp_path),
        tls=mode,  # type: ignore[arg-type]
        ca_file=ca_file(tmp_path),
    )
    smart = MXServer(
        "127.0.0.5",
        port,
        cert=cert,
        implicit_tls=mode == "implicit",
        auth={"relayuser": "s3cret"},
        auth_required=True,
    )
    with smart:
        [a] = deliver(config(dns_server, 25, route), ["bob@example.test"])
        assert a.status == "sent", a.reply
        assert a.host == "127.0.0.5" and a.port == port and a.tls is not None
        [m] = smart.messages
        assert m.auth_user == "relayuser" and m.tls
    assert dns_server.queries == []


def test_route_auth_failure_defers(dns_server: DNSServer, tmp_path: Path) -> None:
    port = free_port("127.0.0.5")
    route = Route(
        "*",
        HostPort("127.0.0.5", port),
        username="relayuser",
        password_file=_password(tmp_path),
        ca_file=ca_file(tmp_path),
    )
    cert = server_cert_files(tmp_path, "127.0.0.5")
    with MXServer("127.0.0.5", port, cert=cert, auth={"relayuser": "other"}) as smart:
        [a] = deliver(config(dns_server, 25, route), ["bob@example.test"])
        assert a.status == "deferred" and "AUTH" in a.reply
        assert smart.messages == []


def test_route_auth_never_in_clear(dns_server: DNSServer, tmp_path: Path) -> None:
    port = free_port("127.0.0.5")
    clear = Route(
        "*",
        HostPort("127.0.0.5", port),
        username="relayuser",
        password_file=_password(tmp_path),
        tls="none",
    )
    with MXServer("127.0.0.5", port, auth={"relayuser": "s3cret"}) as smart:
        [a] = deliver(config(dns_server, 25, clear), ["bob@example.test"])
        assert a.status == "deferred" and a.dsn == "4.7.4"
        assert smart.connections == 0


def test_route_starttls_never_falls_back_to_clear(dns_server: DNSServer, tmp_path: Path) -> None:
    port = free_port("127.0.0.5")
    route = Route(
        "*",
        HostPort("127.0.0.5", port),
        username="relayuser",
        password_file=_password(tmp_path),
    )
    with MXServer("127.0.0.5", port, auth={"relayuser": "s3cret"}) as smart:
        [a] = deliver(config(dns_server, 25, route), ["bob@example.test"])
        assert a.status == "deferred" and a.dsn == "4.7.4"
        assert smart.messages == [] and smart.rcpts == []


def test_exact_route_beats_star(dns_server: DNSServer, pool: MXPool) -> None:
    star = Route("*", HostPort("127.0.0.2", pool.port), tls="none")
    exact = Route("example.test", HostPort("127.0.0.3", pool.port), tls="none")
    attempts = deliver(config(dns_server, 25, star, exact), ["a@example.test", "b@other.test"])
    got = by_rcpt(attempts)
    assert got["a@example.test"].address == "127.0.0.3"
    assert got["b@other.test"].address == "127.0.0.2"
    assert [m.rcpt_tos for m in pool["127.0.0.3"].messages] == [["a@example.test"]]
    assert [m.rcpt_tos for m in pool["127.0.0.2"].messages] == [["b@other.test"]]


# --- extensions -------------------------------------------------------------------------


def test_8bit_and_smtputf8_parameters(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("example.test"))
    body = "Subject: café\r\n\r\nnaïve\r\n".encode()
    [a] = deliver(config(dns_server, pool.port), ["jörg@example.test"], data=body)
    assert a.status == "sent"
    [m] = pool.messages
    assert "BODY=8BITMIME" in m.mail_options and "SMTPUTF8" in m.mail_options
    assert m.rcpt_tos == ["jörg@example.test"] and m.data == body


class Scripted:
    """A raw SMTP server script for what aiosmtpd does not offer (PIPELINING,
    a small SIZE, no SMTPUTF8, EHLO refused). Replies to MAIL/RCPT/DATA only
    once DATA has arrived when pipelining, so a client that waits for each
    reply would hang and time out instead of passing.
    """

    def __init__(self, extensions: list[str], *, refuse_ehlo: bool = False) -> None:
        self.extensions = extensions
        self.refuse_ehlo = refuse_ehlo
        self.commands: list[str] = []
        self.data = b""

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 raw.test ESMTP\r\n")
            pending: list[bytes] = []
            for _ in range(100):
                line = await asyncio.wait_for(reader.readline(), 10)
                if not line:
                    return
                cmd = line.decode().strip()
                self.commands.append(cmd)
                verb = cmd.split(" ")[0].split(":")[0].upper()
                if verb in ("MAIL", "RCPT"):
                    pending.append(b"250 2.1.0 ok\r\n")
                    if "PIPELINING" not in self.extensions:
                        writer.write(b"".join(pending))
                        pending.clear()
                    continue
                writer.write(b"".join(pending))
                pending.clear()
                if verb == "DATA":
                    writer.write(b"354 go\r\n")
                    self.data = await asyncio.wait_for(reader.readuntil(b"\r\n.\r\n"), 10)
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == "EHLO":
                    lines = ["raw.test", *self.extensions]
                    if self.refuse_ehlo:
                        writer.write(b"502 5.5.2 what?\r\n")
                    else:
                        text = "".join(f"250-{x}\r\n" for x in lines[:-1]) + f"250 {lines[-1]}\r\n"
                        writer.write(text.encode())
                elif verb == "QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


def _scripted_delivery(
    dns_server: DNSServer, script: Scripted, rcpts: list[str], data: bytes = MESSAGE
) -> list[Attempt]:
    port = free_port("127.0.0.2")
    dns_server.add("example.test MX 10 mx1.test", "mx1.test A 127.0.0.2")
    with MXServer("127.0.0.2", port) as mx:
        mx.raw_handler = script
        return deliver(config(dns_server, port, command_timeout=1.0), rcpts, data=data)


def test_pipelining_sends_envelope_in_one_go(dns_server: DNSServer) -> None:
    script = Scripted(["PIPELINING", "8BITMIME"])
    attempts = _scripted_delivery(dns_server, script, ["a@example.test", "b@example.test"])
    assert [a.status for a in attempts] == ["sent"]
    assert script.commands[1:5] == [
        "MAIL FROM:<alice@origin.test>",
        "RCPT TO:<a@example.test>",
        "RCPT TO:<b@example.test>",
        "DATA",
    ]
    assert script.data.endswith(b"Hello.\r\n.\r\n")


def test_message_over_server_size_fails_before_mail(dns_server: DNSServer) -> None:
    script = Scripted(["SIZE 20"])
    [a] = _scripted_delivery(dns_server, script, ["a@example.test"])
    assert a.status == "failed" and a.dsn == "5.3.4"
    assert not any(c.startswith("MAIL") for c in script.commands)


def test_smtputf8_needed_but_not_offered_fails(dns_server: DNSServer) -> None:
    script = Scripted(["8BITMIME"])
    [a] = _scripted_delivery(dns_server, script, ["jörg@example.test"])
    assert a.status == "failed" and a.dsn == "5.6.7"
    assert not any(c.startswith("MAIL") for c in script.commands)


def test_ehlo_refused_falls_back_to_helo(dns_server: DNSServer) -> None:
    script = Scripted([], refuse_ehlo=True)
    [a] = _scripted_delivery(dns_server, script, ["a@example.test"])
    assert a.status == "sent"
    assert script.commands[:2] == ["EHLO relay.origin.test", "HELO relay.origin.test"]
    assert script.commands[2] == "MAIL FROM:<alice@origin.test>"


# --- connection reuse -------------------------------------------------------------------


def test_connection_reuse_across_messages(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("example.test", [10, 20]))
    cfg = config(dns_server, pool.port)

    async def go() -> list[Attempt]:
        agent = DeliveryAgent(cfg, make_resolver(cfg.dns))
        attempts: list[Attempt] = []
        try:
            for i in range(5):
                env = envelope("alice@origin.test", f"r{i}@example.test")
                attempts += await agent.deliver(env, MESSAGE, [f"r{i}@example.test"])
        finally:
            await agent.close()
        return attempts

    attempts = run(go())
    assert [a.status for a in attempts] == ["sent"] * 5
    assert len(pool[0].messages) == 5
    assert pool[0].connections < 5
    assert {m.connection for m in pool[0].messages} == {0}


def test_idle_session_expires(dns_server: DNSServer, pool: MXPool) -> None:
    dns_server.add(*pool.mx_records("example.test", [10, 20]))
    cfg = config(dns_server, pool.port)

    async def go() -> None:
        agent = DeliveryAgent(cfg, make_resolver(cfg.dns), idle_timeout=0.2)
        try:
            await agent.deliver(envelope("", "a@example.test"), MESSAGE, ["a@example.test"])
            await asyncio.sleep(0.5)
            await agent.deliver(envelope("", "b@example.test"), MESSAGE, ["b@example.test"])
        finally:
            await agent.close()

    run(go())
    assert pool[0].connections == 2 and len(pool[0].messages) == 2


def test_reuse_survives_a_server_that_closed_the_idle_session(
    dns_server: DNSServer, pool: MXPool
) -> None:
    dns_server.add(*pool.mx_records("example.test", [10, 20]))
    cfg = config(dns_server, pool.port)

    async def go() -> list[Attempt]:
        agent = DeliveryAgent(cfg, make_resolver(cfg.dns))
        try:
            first = await agent.deliver(envelope("", "a@example.test"), MESSAGE, ["a@example.test"])
            await asyncio.to_thread(pool[0].stop)  # aborts the idle connection
            await asyncio.to_thread(pool[0].start)
            second = await agent.deliver(
                envelope("", "b@example.test"), MESSAGE, ["b@example.test"]
            )
            return first + second
        finally:
            await agent.close()

    attempts = run(go())
    assert [a.status for a in attempts] == ["sent", "sent"]
    assert pool[0].connections == 2 and pool[1].connections == 0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_delivery_over_ipv6(dns_server: DNSServer) -> None:
    port = free_port("::1")
    dns_server.add("six.test MX 10 mx6.six.test", "mx6.six.test AAAA ::1")
    with MXServer("::1", port) as mx:
        [a] = deliver(config(dns_server, port), ["bob@six.test"])
        assert a.status == "sent" and a.address == "::1"
        assert mx.messages[0].rcpt_tos == ["bob@six.test"]
