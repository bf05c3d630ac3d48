"""Connection limits from the TCP accept, the TLS handshake bound, the hard error limit.

SPEC section 7: connections on an implicit-TLS port that never finish the
handshake count against ``max_connections`` and ``max_connections_per_ip``
from the accept, and a handshake gets 10 s; 20 refused commands end a
session with ``421 4.7.0``. Everything runs against a real relayd on
loopback, with raw sockets from several 127.0.0.N source addresses.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.certs import client_context
from support.relayd_proc import HOSTNAME, ListenerSpec, RawClient, Relayd

HANDSHAKE = 10.0  # SPEC: a TLS handshake gets 10 s
LISTENERS = (
    ListenerSpec("inbound", "inbound", "starttls"),
    ListenerSpec("submissions", "submission", "implicit"),
)


def silent(port: int, source: str) -> socket.socket:
    """A TCP connection from ``source`` that never sends a byte."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if relayd closes ``sock`` within ``seconds`` (EOF or reset); no data expected."""
    sock.settimeout(seconds)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    assert data == b"", f"relayd sent clear text on an implicit-TLS port: {data!r}"
    return True


def wait_closed(sock: socket.socket, deadline: float) -> float:
    """Monotonic time at which relayd closed ``sock``; fails if still open at ``deadline``."""
    while time.monotonic() < deadline:
        if closed_within(sock, min(0.2, max(0.01, deadline - time.monotonic()))):
            return time.monotonic()
    raise AssertionError("connection still open after the handshake timeout")


def tls_greeting(port: int, source: str) -> str:
    """Connect over implicit TLS from ``source``; relayd's first reply line."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    with client_context().wrap_socket(raw, server_hostname=HOSTNAME) as tls:
        client = RawClient(tls)
        return client.reply()


def tls_refused(port: int, source: str) -> bool:
    """True if relayd closes the connection instead of completing the TLS handshake."""
    try:
        tls_greeting(port, source)
    except (ssl.SSLError, ConnectionError, OSError):
        return True
    return False


@contextlib.contextmanager
def closing_all(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()


def test_silent_implicit_tls_clients_count_per_ip_and_get_10s(tmp_path: Path) -> None:
    per_ip = 3
    extra = f"[limits]\nmax_connections_per_ip = {per_ip}\n"
    with Relayd(tmp_path, listeners=LISTENERS, extra=extra) as r:
        r.start()
        port = r.port("submissions")
        with closing_all([]) as held, closing_all([]) as extras:
            started = time.monotonic()
            held += [silent(port, "127.0.0.1") for _ in range(per_ip)]
            stall = RawClient(silent(r.port("inbound"), "127.0.0.3"))  # a stalled STARTTLS
            assert stall.reply().startswith("220")
            assert stall.cmd("EHLO client.test").startswith("250")
            assert stall.cmd("STARTTLS").startswith("220")
            held.append(stall.sock)
            time.sleep(0.3)  # the held ones are accepted (and counted) first
            extras += [silent(port, "127.0.0.1") for _ in range(5)]
            for sock in extras:  # over the limit: closed at once, nothing said in clear
                assert closed_within(sock, 3.0)
            for sock in held:
                assert not closed_within(sock, 0.1)
            assert tls_refused(port, "127.0.0.1")  # still full for this address...
            assert tls_greeting(port, "127.0.0.2").startswith("220 ")  # ...not for others
            for sock in held:
                gone = wait_closed(sock, started + HANDSHAKE + 4)
                assert gone - started >= HANDSHAKE - 1
        assert tls_greeting(port, "127.0.0.1").startswith("220 ")  # slots released
        log = r.wait_log("lost connection during TLS handshake from unknown[127.0.0.1]: timeout")
        assert log.count("during TLS handshake from unknown[127.0.0.1]: timeout") == per_ip
        assert "during TLS handshake from unknown[127.0.0.3]: timeout" in log  # the STARTTLS one
        assert r.stop() == 0


def test_silent_implicit_tls_clients_count_against_max_connections(tmp_path: Path) -> None:
    total = 4
    extra = f"[limits]\nmax_connections = {total}\n"
    with Relayd(tmp_path, listeners=LISTENERS, extra=extra) as r:
        r.start()
        port = r.port("submissions")
        sources = [f"127.0.0.{10 + i}" for i in range(total + 4)]
        with closing_all([]) as held, closing_all([]) as extras:
            started = time.monotonic()
            for source in sources[:total]:
                held.append(silent(port, source))
            time.sleep(0.3)
            for source in sources[total:]:
                extras.append(silent(port, source))
            for sock in extras:
                assert closed_within(sock, 3.0)
            for sock in held:
                assert not closed_within(sock, 0.1)
            with RawClient(silent(r.port("inbound"), "127.0.0.30")) as clear:
                assert clear.reply().startswith("421 4.7.0")  # clear text can be told why
            for sock in held:
                wait_closed(sock, started + HANDSHAKE + 4)
        assert tls_greeting(port, "127.0.0.40").startswith("220 ")
        assert r.stop() == 0


def bad(client: RawClient) -> str:
    return client.cmd("RCPT TO:<bob@example.org>")  # no MAIL yet: 503


@pytest.fixture
def relayd(tmp_path: Path) -> Iterator[Relayd]:
    with Relayd(tmp_path, listeners=LISTENERS) as r:
        yield r.start()
        r.stop()


def test_nineteen_refused_commands_do_not_end_the_session(relayd: Relayd) -> None:
    with RawClient(silent(relayd.port("inbound"), "127.0.0.1")) as c:
        c.reply()
        for _ in range(19):
            assert bad(c).startswith("503 5.5.1")
        assert c.cmd("NOOP").startswith("250")
        assert c.cmd("EHLO client.test").startswith("250")


def test_twenty_refused_commands_end_the_session_with_421(relayd: Relayd) -> None:
    with RawClient(silent(relayd.port("inbound"), "127.0.0.1")) as c:
        c.reply()
        assert c.cmd("HELO client.test").startswith("250")
        for _ in range(20):
            assert bad(c).startswith("503 5.5.1")
        assert c.cmd("NOOP").startswith("421 4.7.0")
        assert closed_within(c.sock, 5.0)
    relayd.wait_log("too many errors after RCPT from unknown[127.0.0.1]")


def test_pipelined_errors_stop_at_the_limit(relayd: Relayd) -> None:
    """Nothing the client pipelined behind the 20th refused command is executed."""
    with RawClient(silent(relayd.port("inbound"), "127.0.0.1")) as c:
        c.reply()
        c.send(b"RCPT TO:<bob@example.org>\r\n" * 25 + b"HELO client.test\r\nNOOP\r\n")
        replies = []
        with contextlib.suppress(ConnectionError):
            for _ in range(30):
                replies.append(c.reply())
        assert [r[:9] for r in replies] == ["503 5.5.1"] * 20 + ["421 4.7.0"]


def test_recipients_over_the_limit_are_not_errors(tmp_path: Path) -> None:
    """452 4.5.3 tells a client to send the rest later; the session goes on to DATA."""
    with Relayd(tmp_path, listeners=LISTENERS, extra="[limits]\nmax_recipients = 2\n") as r:
        r.start()
        with RawClient(silent(r.port("inbound"), "127.0.0.1")) as c:
            c.reply()
            assert c.cmd("EHLO client.test").startswith("250")
            assert c.cmd("MAIL FROM:<alice@example.com>").startswith("250")
            replies = [c.cmd(f"RCPT TO:<bob{i}@example.org>")[:9] for i in range(30)]
            assert replies == ["250 2.1.5"] * 2 + ["452 4.5.3"] * 28
            assert c.cmd("DATA").startswith("354")
            assert c.cmd("Subject: x\r\n\r\nhi\r\n.").startswith("250 2.0.0 Ok: queued as ")
        assert r.stop() == 0
