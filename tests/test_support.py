"""Tests for the test harness itself: if the stand-in Internet lies, every other test lies too.

Each server is exercised with an independent client (dnspython's resolver,
smtplib, aiosmtplib), never with relayd code, so a bug in relayd cannot hide
a bug in the harness.
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import dns.flags
import dns.rdatatype
import dns.resolver
import pytest
import trustme
from support import certs, fixtures
from support.dnsserver import DNSServer
from support.mxserver import MXPool, MXServer
from support.ports import free_port

# The shared fixtures, bound here so this file also runs without the project's conftest.
tls_ca = fixtures.tls_ca
dns_server = fixtures.dns_server
mx_pool = fixtures.mx_pool

# --------------------------------------------------------------------------- DNS


def test_dns_address_form(dns_server: DNSServer) -> None:
    assert dns_server.port > 0
    assert dns_server.address == f"127.0.0.1:{dns_server.port}"


@pytest.mark.parametrize(
    ("line", "qname", "qtype", "expected"),
    [
        ("host.example.test A 127.0.0.2", "host.example.test", "A", "127.0.0.2"),
        ("host.example.test AAAA ::1", "host.example.test", "AAAA", "::1"),
        (
            "example.test MX 10 mx1.example.test",
            "example.test",
            "MX",
            "10 mx1.example.test.",
        ),
        (
            'example.test TXT "v=spf1 ip4:127.0.0.1 -all"',
            "example.test",
            "TXT",
            '"v=spf1 ip4:127.0.0.1 -all"',
        ),
        (
            "alias.example.test CNAME host.example.test",
            "alias.example.test",
            "CNAME",
            "host.example.test.",
        ),
        ("127.0.0.2 PTR mx1.example.test", "2.0.0.127.in-addr.arpa", "PTR", "mx1.example.test."),
        (
            "2.0.0.127.in-addr.arpa PTR mx1.example.test",
            "2.0.0.127.in-addr.arpa",
            "PTR",
            "mx1.example.test.",
        ),
        ("example.test NS ns1.example.test", "example.test", "NS", "ns1.example.test."),
    ],
)
def test_dns_record_types(
    dns_server: DNSServer, line: str, qname: str, qtype: str, expected: str
) -> None:
    dns_server.add(line)
    answer = dns_server.resolver().resolve(qname, qtype)
    assert [rdata.to_text() for rdata in answer] == [expected]
    assert answer.response.flags & dns.flags.AA


def test_dns_several_records_and_ttl(dns_server: DNSServer) -> None:
    dns_server.add(
        "example.test 60 MX 10 mx1.example.test",
        "example.test 60 MX 20 mx2.example.test",
        "mx1.example.test IN A 127.0.0.2",
    )
    answer = dns_server.resolver().resolve("example.test", "MX")
    assert sorted((r.preference, r.exchange.to_text()) for r in answer) == [
        (10, "mx1.example.test."),
        (20, "mx2.example.test."),
    ]
    assert answer.rrset is not None and answer.rrset.ttl == 60
    default = dns_server.resolver().resolve("mx1.example.test", "A").rrset
    assert default is not None and default.ttl == 300


def test_dns_names_are_case_insensitive_with_optional_dot(dns_server: DNSServer) -> None:
    dns_server.add("MiXed.Example.TEST. A 127.0.0.3")
    answer = dns_server.resolver().resolve("mixed.example.test", "A")
    assert [r.address for r in answer] == ["127.0.0.3"]
    assert dns_server.queries == [("mixed.example.test", "A")]


def test_dns_cname_is_followed(dns_server: DNSServer) -> None:
    dns_server.add("alias.example.test CNAME host.example.test", "host.example.test A 127.0.0.4")
    answer = dns_server.resolver().resolve("alias.example.test", "A")
    assert [r.address for r in answer] == ["127.0.0.4"]
    assert answer.canonical_name.to_text() == "host.example.test."


def test_dns_unknown_is_nxdomain_and_missing_type_is_nodata(dns_server: DNSServer) -> None:
    dns_server.add('sel._domainkey.example.test TXT "v=DKIM1; p="')
    resolver = dns_server.resolver()
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("unknown.test", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("sel._domainkey.example.test", "A")
    # An empty non-terminal exists (it has a child), so it is NOERROR, not NXDOMAIN.
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("_domainkey.example.test", "TXT")


def test_dns_long_txt_is_split_and_travels_over_tcp(dns_server: DNSServer) -> None:
    key = "MIIB" + "A" * 700
    dns_server.add(f'sel._domainkey.example.test TXT "v=DKIM1; k=rsa; p={key}"')
    answer = dns_server.resolver().resolve("sel._domainkey.example.test", "TXT")
    strings = answer[0].strings
    assert [len(s) for s in strings[:-1]] == [255] * (len(strings) - 1)
    assert b"".join(strings) == f"v=DKIM1; k=rsa; p={key}".encode()
    # Over 512 bytes without EDNS: the UDP answer was truncated, TCP carried it.
    assert [t for (_n, _t, t) in dns_server.query_log] == ["udp", "tcp"]


def test_dns_txt_keeps_given_strings(dns_server: DNSServer) -> None:
    dns_server.add('example.test TXT "part one" "part two"')
    answer = dns_server.resolver().resolve("example.test", "TXT")
    assert answer[0].strings == (b"part one", b"part two")


def test_dns_fault_nxdomain_and_servfail(dns_server: DNSServer) -> None:
    dns_server.add("gone.test A 127.0.0.2", "broken.test A 127.0.0.2")
    dns_server.fault("gone.test", "nxdomain")
    dns_server.fault("broken.test", "servfail")
    resolver = dns_server.resolver()
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("gone.test", "A")
    with pytest.raises(dns.resolver.NoNameservers) as info:
        resolver.resolve("broken.test", "A")
    assert "SERVFAIL" in str(info.value)
    dns_server.unfault("broken.test")
    assert [r.address for r in resolver.resolve("broken.test", "A")] == ["127.0.0.2"]


def test_dns_fault_timeout_sends_nothing(dns_server: DNSServer) -> None:
    dns_server.add("slow.test A 127.0.0.2")
    dns_server.fault("slow.test", "timeout")
    with pytest.raises(dns.resolver.LifetimeTimeout):
        dns_server.resolver(lifetime=0.3).resolve("slow.test", "A")
    with pytest.raises(dns.resolver.LifetimeTimeout):
        dns_server.resolver(lifetime=0.3).resolve("slow.test", "A", tcp=True)
    assert ("slow.test", "A") in dns_server.queries


def test_dns_fault_truncate_falls_back_to_tcp(dns_server: DNSServer) -> None:
    dns_server.add("example.test MX 10 mx1.example.test")
    dns_server.fault("example.test", "truncate")
    answer = dns_server.resolver().resolve("example.test", "MX")
    assert [r.exchange.to_text() for r in answer] == ["mx1.example.test."]
    assert dns_server.query_log == [("example.test", "MX", "udp"), ("example.test", "MX", "tcp")]


def test_dns_fault_by_type_only(dns_server: DNSServer) -> None:
    dns_server.add("example.test A 127.0.0.2", "example.test MX 10 mx1.example.test")
    dns_server.fault("example.test", "servfail", rdtype="MX")
    resolver = dns_server.resolver()
    assert [r.address for r in resolver.resolve("example.test", "A")] == ["127.0.0.2"]
    with pytest.raises(dns.resolver.NoNameservers):
        resolver.resolve("example.test", "MX")


def test_dns_fault_on_unknown_name_and_bad_kind(dns_server: DNSServer) -> None:
    dns_server.fault("nowhere.test", "servfail")
    with pytest.raises(dns.resolver.NoNameservers):
        dns_server.resolver().resolve("nowhere.test", "A")
    with pytest.raises(ValueError, match="unknown fault"):
        dns_server.fault("x.test", "explode")


def test_dns_remove_and_clear(dns_server: DNSServer) -> None:
    dns_server.add("example.test A 127.0.0.2", "example.test MX 10 mx1.example.test")
    resolver = dns_server.resolver()
    dns_server.remove("EXAMPLE.test.", "MX")
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("example.test", "MX")
    dns_server.remove("example.test")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("example.test", "A")
    dns_server.add("other.test A 127.0.0.2")
    dns_server.fault("other.test", "servfail")
    dns_server.clear()
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("other.test", "A")


def test_dns_bad_lines_add_nothing(dns_server: DNSServer) -> None:
    with pytest.raises(ValueError):
        dns_server.add("good.test A 127.0.0.2", "bad.test BOGUS 1")
    with pytest.raises(ValueError):
        dns_server.add("justaname.test")
    with pytest.raises(dns.resolver.NXDOMAIN):
        dns_server.resolver().resolve("good.test", "A")


def test_dns_records_queries_for_cache_assertions(dns_server: DNSServer) -> None:
    dns_server.add("example.test MX 10 mx1.example.test")
    resolver = dns_server.resolver()
    resolver.cache = dns.resolver.Cache()
    for _ in range(3):
        resolver.resolve("example.test", "MX")
    assert dns_server.queries == [("example.test", "MX")]


def test_dns_from_asyncio(dns_server: DNSServer) -> None:
    dns_server.add("example.test A 127.0.0.2")

    async def lookup() -> list[str]:
        answer = await dns_server.async_resolver().resolve("example.test", "A")
        return [r.address for r in answer]

    assert asyncio.run(lookup()) == ["127.0.0.2"]


def test_dns_ipv6_loopback() -> None:
    with DNSServer(host="::1") as server:
        server.add("example.test AAAA ::1")
        assert server.address == f"[::1]:{server.port}"
        answer = server.resolver().resolve("example.test", "AAAA")
        assert [r.address for r in answer] == ["::1"]


def test_dns_refuses_non_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        DNSServer(host="192.0.2.1")


def test_dns_stop_releases_port_and_thread() -> None:
    before = threading.active_count()
    server = DNSServer().start()
    port = server.port
    server.stop()
    server.stop()  # idempotent
    assert threading.active_count() == before
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))


def test_dns_rdtype_text_in_queries(dns_server: DNSServer) -> None:
    with pytest.raises(dns.resolver.NXDOMAIN):
        dns_server.resolver().resolve("x.test", dns.rdatatype.AAAA)
    assert dns_server.queries == [("x.test", "AAAA")]


# --------------------------------------------------------------------------- ports


def test_free_port_is_free_on_every_address() -> None:
    hosts = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
    port = free_port(*hosts)
    sockets = []
    try:
        for host in hosts:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, port))
    finally:
        for sock in sockets:
            sock.close()
    assert 0 < free_port() < 65536
    assert free_port("::1") > 0


def test_free_port_refuses_non_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        free_port("192.0.2.1")


# --------------------------------------------------------------------------- certs


def test_certs_files_and_contexts(tmp_path: Path, tls_ca: trustme.CA) -> None:
    assert tls_ca is certs.ca()
    cert_path, key_path = certs.server_cert_files(tmp_path, "mx.test", "127.0.0.1")
    assert cert_path.read_bytes().count(b"BEGIN CERTIFICATE") >= 1
    assert b"PRIVATE KEY" in key_path.read_bytes()
    server_ctx = certs.server_context((cert_path, key_path))
    ca_path = certs.ca_file(tmp_path)
    from_file = ssl.create_default_context(cafile=str(ca_path))
    for client_ctx, name in ((certs.client_context(), "mx.test"), (from_file, "127.0.0.1")):
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            port = listener.getsockname()[1]

            def serve(lst: socket.socket = listener) -> None:
                conn, _ = lst.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
                    tls_conn.recv(1)

            thread = threading.Thread(target=serve)
            thread.start()
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                client_ctx.wrap_socket(raw, server_hostname=name) as tls,
            ):
                assert tls.version() is not None
                tls.sendall(b"x")
            thread.join(5)
            assert not thread.is_alive()


def test_certs_client_context_rejects_wrong_name(tmp_path: Path) -> None:
    cert = certs.server_cert_files(tmp_path, "other.test")
    with MXServer("127.0.0.2", 0, cert=cert) as mx, smtp_client(mx) as client:
        client.ehlo("client.test")
        with pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(context=certs.client_context())


# --------------------------------------------------------------------------- MX servers


@contextlib.contextmanager
def smtp_client(
    mx: MXServer, timeout: float = 5.0, *, implicit: bool = False
) -> Iterator[smtplib.SMTP]:
    """An smtplib client connected to ``mx``, closed afterwards whatever happened."""
    client: smtplib.SMTP
    if implicit:
        client = smtplib.SMTP_SSL(mx.host, mx.port, timeout=timeout, context=certs.client_context())
    else:
        client = smtplib.SMTP(mx.host, mx.port, timeout=timeout)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    return certs.server_cert_files(tmp_path, "mx.test", *(f"127.0.0.{i}" for i in range(2, 10)))


@pytest.fixture
def mx() -> Iterator[MXServer]:
    with MXServer("127.0.0.2", 0) as server:
        yield server


MSG = b"From: a@src.test\r\nTo: b@dst.test\r\nSubject: hi\r\n\r\n.leading dot\r\nbody\r\n"


def test_mx_plain_delivery_records_everything(mx: MXServer) -> None:
    with smtp_client(mx) as client:
        code, banner = client.ehlo("client.test")
        assert code == 250
        assert b"STARTTLS" not in banner and b"AUTH" not in banner
        client.sendmail("a@src.test", ["b@dst.test"], MSG, mail_options=["BODY=8BITMIME"])
        client.quit()
    [message] = mx.wait_for_messages(1, timeout=5)
    assert message.mail_from == "a@src.test"
    assert message.rcpt_tos == ["b@dst.test"]
    assert message.data == MSG
    assert message.tls is False and message.auth_user is None
    assert message.peer == "127.0.0.1"
    assert message.helo == "client.test"
    assert "BODY=8BITMIME" in message.mail_options
    assert message.connection == 0 and mx.connections == 1
    assert message.reply == "250 2.0.0 OK queued"


def test_mx_greeting_and_ehlo_name(mx: MXServer) -> None:
    with smtp_client(mx) as client:
        code, _ = client.ehlo("c.test")
        assert code == 250
        assert client.ehlo_resp is not None and client.ehlo_resp.startswith(b"mx.test")
    mx.greeting = "220 custom.test ESMTP hello"
    with (
        socket.create_connection((mx.host, mx.port), timeout=5) as sock,
        sock.makefile("rb") as stream,
    ):
        assert stream.readline() == b"220 custom.test ESMTP hello\r\n"


def test_mx_per_recipient_replies(mx: MXServer) -> None:
    mx.reply_for("grey@dst.test", "451 4.7.1 greylisted")
    mx.reply_for("NoBody@dst.test", "550 5.1.1 no such user")
    with smtp_client(mx) as client:
        refused = client.sendmail(
            "a@src.test", ["ok@dst.test", "grey@dst.test", "nobody@DST.test"], MSG
        )
    assert refused == {
        "grey@dst.test": (451, b"4.7.1 greylisted"),
        "nobody@DST.test": (550, b"5.1.1 no such user"),
    }
    [message] = mx.wait_for_messages(1, timeout=5)
    assert message.rcpt_tos == ["ok@dst.test"]
    assert [reply[:3] for _, reply in mx.rcpts] == ["250", "451", "550"]


def test_mx_reply_sequences_and_default(mx: MXServer) -> None:
    mx.reply_for("*", "550 5.7.1 nobody here")
    mx.reply_for("b@dst.test", "451 4.7.1 try later", "250 2.1.5 OK now")
    with smtp_client(mx) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("a@src.test", ["b@dst.test", "x@dst.test"], MSG)
        client.rset()
        assert client.sendmail("a@src.test", ["b@dst.test"], MSG) == {}
        client.rset()
        assert client.sendmail("a@src.test", ["b@dst.test"], MSG) == {}
    assert len(mx.wait_for_messages(2, timeout=5)) == 2


def test_mx_multiline_reply(mx: MXServer) -> None:
    mx.reply_for("b@dst.test", "550-5.7.1 first line\n550 5.7.1 second line")
    with smtp_client(mx) as client:
        client.ehlo("c.test")
        client.mail("a@src.test")
        code, text = client.rcpt("b@dst.test")
    assert (code, text) == (550, b"5.7.1 first line\n5.7.1 second line")


def test_mx_data_reply(mx: MXServer) -> None:
    mx.data_reply("554 5.7.1 spam detected", "250 2.0.0 OK id=2")
    with smtp_client(mx) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("a@src.test", ["b@dst.test"], MSG)
        assert info.value.smtp_code == 554
        client.rset()
        client.sendmail("a@src.test", ["b@dst.test"], MSG)
    [message] = mx.wait_for_messages(1, timeout=5)
    assert message.reply == "250 2.0.0 OK id=2"
    assert [a.reply for a in mx.attempts] == ["554 5.7.1 spam detected", "250 2.0.0 OK id=2"]


def test_mx_mail_reply(mx: MXServer) -> None:
    mx.mail_reply("452 4.3.1 insufficient storage")
    with smtp_client(mx) as client, pytest.raises(smtplib.SMTPSenderRefused):
        client.sendmail("a@src.test", ["b@dst.test"], MSG)


def test_mx_bad_script_values(mx: MXServer) -> None:
    with pytest.raises(ValueError):
        mx.reply_for("a@b.test", "OK")
    with pytest.raises(ValueError):
        mx.data_reply()
    with pytest.raises(ValueError, match="unknown behaviour"):
        mx.behaviour = "explode"
    with pytest.raises(ValueError, match="cert"):
        MXServer("127.0.0.2", 0, implicit_tls=True)
    with pytest.raises(ValueError, match="loopback"):
        MXServer("192.0.2.1", 25)


def test_mx_starttls(cert: tuple[Path, Path]) -> None:
    with MXServer("127.0.0.3", 0, cert=cert) as mx, smtp_client(mx) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        client.starttls(context=certs.client_context())
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        assert not client.has_extn("auth")  # no accounts configured
        client.sendmail("a@src.test", ["b@dst.test"], MSG)
        [message] = mx.wait_for_messages(1, timeout=5)
    assert message.tls is True and message.peer == "127.0.0.1"


def test_mx_require_tls(cert: tuple[Path, Path]) -> None:
    with MXServer("127.0.0.2", 0, cert=cert, require_tls=True) as mx, smtp_client(mx) as client:
        client.ehlo("client.test")
        code, _ = client.mail("a@src.test")
        assert code == 530
        client.starttls(context=certs.client_context())
        client.sendmail("a@src.test", ["b@dst.test"], MSG)
        assert mx.wait_for_messages(1, timeout=5)[0].tls


def test_mx_implicit_tls(cert: tuple[Path, Path]) -> None:
    auth = {"relay": "s3cret"}
    with MXServer("127.0.0.2", 0, cert=cert, implicit_tls=True, auth=auth) as mx:
        with smtp_client(mx, implicit=True) as client:
            client.ehlo("client.test")
            assert not client.has_extn("starttls")
            assert client.has_extn("auth")
            client.login("relay", "s3cret")
            client.sendmail("a@src.test", ["b@dst.test"], MSG)
        [message] = mx.wait_for_messages(1, timeout=5)
        assert message.tls and message.auth_user == "relay"
        # A client speaking plain SMTP to an implicit-TLS port gets no greeting.
        with pytest.raises((smtplib.SMTPServerDisconnected, TimeoutError, OSError)):
            smtplib.SMTP(mx.host, mx.port, timeout=0.3).close()


def test_mx_auth_only_after_tls(cert: tuple[Path, Path]) -> None:
    users = {"alice": "wonder", "bob": "builder"}
    with MXServer("127.0.0.2", 0, cert=cert, auth=users, auth_required=True) as mx:
        with smtp_client(mx) as client:
            client.ehlo("client.test")
            assert not client.has_extn("auth")
            code, _ = client.docmd("AUTH", "PLAIN " + "AGFsaWNlAHdvbmRlcg==")
            assert code == 538
            code, _ = client.mail("a@src.test")
            assert code == 530  # auth_required
            client.starttls(context=certs.client_context())
            client.ehlo("client.test")
            assert set(client.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("alice", "wrong")
            client.login("alice", "wonder")
            client.sendmail("a@src.test", ["b@dst.test"], MSG)
        with smtp_client(mx) as client:
            client.starttls(context=certs.client_context())
            client.ehlo("client.test")
            client.user, client.password = "bob", "builder"
            client.auth("LOGIN", client.auth_login)
            client.sendmail("b@src.test", ["c@dst.test"], MSG)
        messages = mx.wait_for_messages(2, timeout=5)
    assert [(m.auth_user, m.connection) for m in messages] == [("alice", 0), ("bob", 1)]


def test_mx_auth_refused_without_accounts(cert: tuple[Path, Path]) -> None:
    with MXServer("127.0.0.2", 0, cert=cert) as mx, smtp_client(mx) as client:
        client.starttls(context=certs.client_context())
        client.ehlo("client.test")
        code, _ = client.docmd("AUTH", "PLAIN AGFsaWNlAHdvbmRlcg==")
        assert code == 502


def test_mx_421_greeting(mx: MXServer) -> None:
    mx.greeting = "421 4.3.2 busy, try later"
    with pytest.raises(smtplib.SMTPConnectError) as info:
        smtplib.SMTP(mx.host, mx.port, timeout=5)
    assert info.value.smtp_code == 421
    with (
        socket.create_connection((mx.host, mx.port), timeout=5) as sock,
        sock.makefile("rb") as stream,
    ):
        assert stream.readline() == b"421 4.3.2 busy, try later\r\n"
        assert stream.readline() == b""  # the server closed
    assert mx.connections == 2 and mx.messages == []


def test_mx_554_greeting_answers_503_until_quit(mx: MXServer) -> None:
    mx.greeting = "554 5.7.1 no service for you"
    with (
        socket.create_connection((mx.host, mx.port), timeout=5) as sock,
        sock.makefile("rwb") as stream,
    ):
        assert stream.readline().startswith(b"554 ")
        stream.write(b"EHLO c.test\r\n")
        stream.flush()
        assert stream.readline().startswith(b"503 ")
        stream.write(b"QUIT\r\n")
        stream.flush()
        assert stream.readline().startswith(b"221 ")
        assert stream.readline() == b""


def test_mx_no_greeting(mx: MXServer) -> None:
    mx.behaviour = "no_greeting"
    with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
        smtplib.SMTP(mx.host, mx.port, timeout=0.3)
    assert mx.wait_for_connections(1, timeout=5) == 1


def test_mx_hang_after_greeting(mx: MXServer) -> None:
    mx.behaviour = "hang_after_greeting"
    with (
        smtp_client(mx, timeout=0.3) as client,
        pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"),
    ):
        client.ehlo("client.test")


def test_mx_drop_after_data(mx: MXServer) -> None:
    mx.behaviour = "drop_after_data"
    with smtp_client(mx) as client, pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail("a@src.test", ["b@dst.test"], MSG)
    [attempt] = mx.wait_for_attempts(1, timeout=5)
    assert attempt.data == MSG and attempt.reply == ""
    assert mx.messages == []
    mx.behaviour = "normal"
    with smtp_client(mx) as client:
        client.sendmail("a@src.test", ["b@dst.test"], MSG)
    assert mx.wait_for_messages(1, timeout=5)[0].connection == 1


def test_mx_drop_after_data_over_tls(cert: tuple[Path, Path]) -> None:
    with MXServer("127.0.0.2", 0, cert=cert) as mx:
        mx.behaviour = "drop_after_data"
        with smtp_client(mx) as client:
            client.starttls(context=certs.client_context())
            with pytest.raises((smtplib.SMTPServerDisconnected, ssl.SSLError, OSError)):
                client.sendmail("a@src.test", ["b@dst.test"], MSG)
        assert mx.wait_for_attempts(1, timeout=5)[0].tls


def test_mx_hang_at_data_end_ends_on_stop() -> None:
    before = threading.active_count()
    mx = MXServer("127.0.0.2", 0).start()
    mx.behaviour = "hang_at_data_end"
    client = smtplib.SMTP(mx.host, mx.port, timeout=0.3)
    try:
        with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
            client.sendmail("a@src.test", ["b@dst.test"], MSG)
        assert len(mx.wait_for_attempts(1, timeout=5)) == 1
        started = time.monotonic()
        mx.stop()  # the client is still connected and waiting
        assert time.monotonic() - started < 3
    finally:
        client.close()
        mx.stop()
    assert threading.active_count() == before


def test_mx_hanging_sessions_end_on_stop() -> None:
    before = threading.active_count()
    for behaviour in ("no_greeting", "hang_after_greeting"):
        mx = MXServer("127.0.0.2", 0).start()
        mx.behaviour = behaviour
        with socket.create_connection((mx.host, mx.port), timeout=5) as sock:
            mx.wait_for_connections(1, timeout=5)
            started = time.monotonic()
            mx.stop()
            assert time.monotonic() - started < 3
            sock.settimeout(2)
            data = sock.recv(4096)
            for _ in range(10):
                if not data:
                    break
                data = sock.recv(4096)  # the greeting, then EOF
            assert data == b""
    assert threading.active_count() == before


def test_mx_connection_counting(mx: MXServer) -> None:
    with smtp_client(mx) as client:
        client.sendmail("a@src.test", ["b@dst.test"], MSG)
        client.sendmail("a@src.test", ["c@dst.test"], MSG)
    with smtp_client(mx) as client:
        client.sendmail("a@src.test", ["d@dst.test"], MSG)
    messages = mx.wait_for_messages(3, timeout=5)
    assert [m.connection for m in messages] == [0, 0, 1]
    assert mx.connections == 2
    mx.reset()
    assert (mx.connections, mx.messages, mx.attempts) == (0, [], [])


def test_mx_raw_handler_for_broken_replies(mx: MXServer) -> None:
    async def unterminated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220-mx.test\r\n220 and a half")  # no CRLF, then silence
        await writer.drain()
        await asyncio.wait_for(reader.read(1), 10)

    mx.raw_handler = unterminated
    with socket.create_connection((mx.host, mx.port), timeout=5) as sock:
        sock.settimeout(0.3)
        received = b""
        with pytest.raises(TimeoutError):
            for _ in range(10):
                received += sock.recv(4096)
        assert received == b"220-mx.test\r\n220 and a half"


def test_mx_with_aiosmtplib(cert: tuple[Path, Path]) -> None:
    async def send(port: int) -> None:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.2", port=port, tls_context=certs.client_context(), timeout=5
        )
        async with client:
            await client.sendmail("a@src.test", ["b@dst.test"], MSG)

    with MXServer("127.0.0.2", 0, cert=cert) as mx:
        asyncio.run(send(mx.port))
        [message] = mx.wait_for_messages(1, timeout=5)
    assert message.tls  # aiosmtplib upgrades with STARTTLS when offered


def test_mx_pool_of_three_on_one_port(cert: tuple[Path, Path]) -> None:
    before = threading.active_count()
    with MXPool(3, cert=cert) as pool:
        assert [s.host for s in pool.servers] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        assert {s.port for s in pool.servers} == {pool.port}
        assert pool["127.0.0.3"] is pool.servers[1] is pool[1]
        pool["127.0.0.3"].reply_for("b@dst.test", "550 5.1.1 not here")
        for server in pool.servers:
            with smtp_client(server) as client:
                client.ehlo("client.test")
                assert client.ehlo_resp is not None
                assert client.ehlo_resp.split(b"\n")[0] == server.hostname.encode()
                client.starttls(context=certs.client_context())
                client.sendmail("a@src.test", ["b@dst.test", f"{server.hostname}@dst.test"], MSG)
        got = {s.host: [m.rcpt_tos for m in s.wait_for_messages(1, timeout=5)] for s in pool}
        assert got == {
            "127.0.0.2": [["b@dst.test", "mx1.test@dst.test"]],
            "127.0.0.3": [["mx2.test@dst.test"]],
            "127.0.0.4": [["b@dst.test", "mx3.test@dst.test"]],
        }
        assert len(pool.wait_for_messages(3, timeout=1)) == 3
        assert pool.connections == 3
        with pytest.raises(KeyError):
            pool["127.0.0.9"]
    assert threading.active_count() == before


def test_fixtures_dns_and_pool_work_together(dns_server: DNSServer, mx_pool: MXPool) -> None:
    dns_server.add(*mx_pool.mx_records("dst.test", preference=[10, 20, 30, 40]))
    answer = dns_server.resolver().resolve("dst.test", "MX")
    best = min(answer, key=lambda r: r.preference).exchange.to_text(omit_final_dot=True)
    [address] = [r.address for r in dns_server.resolver().resolve(best, "A")]
    server = mx_pool[address]
    assert (best, address, len(mx_pool)) == ("mx1.test", "127.0.0.2", 4)
    with smtplib.SMTP(address, mx_pool.port, timeout=5) as client:
        client.starttls(context=certs.client_context())
        client.sendmail("a@src.test", ["b@dst.test"], MSG)
    assert server.wait_for_messages(1, timeout=5)[0].tls


def test_pool_wait_times_out_quickly() -> None:
    with MXPool(1) as pool:
        with pytest.raises(TimeoutError):
            pool.wait_for_messages(1, timeout=0.1)
        with pytest.raises(TimeoutError):
            pool[0].wait_for_messages(1, timeout=0.1)
