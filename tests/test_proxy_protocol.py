"""PROXY protocol v1/v2 (SPEC section 11): the parser's properties, and a real relayd behind it.

The parser is checked on the formats HAProxy writes and on arbitrary bytes
(it only ever answers "more", a header, or ProxyError). The daemon is
checked as a balancer would use it: the header's client is the one the
relay ACL, the logs and ``Received:`` see; connections from elsewhere,
without a header or with a broken one are closed.
"""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.ports import free_port
from support.relayd_proc import Relayd, send

from relayd.smtpd import proxy

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(min_value=0, max_value=65535)


def test_v1_examples() -> None:
    line = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 25\r\nEHLO x\r\n"
    header = proxy.parse(line)
    assert header == proxy.ProxyHeader(("203.0.113.7", 51234), len(line) - len(b"EHLO x\r\n"))
    assert line[header.length :] == b"EHLO x\r\n"
    assert proxy.parse(b"PROXY UNKNOWN\r\n") == proxy.ProxyHeader(None, 15)
    assert proxy.parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 25\r\n") is not None
    assert proxy.parse(b"PROXY TCP4 203.0.") is None  # more to come
    for bad in (
        b"EHLO x\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234\r\n",
        b"PROXY TCP6 203.0.113.7 192.0.2.1 1 25\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 99999 25\r\n",
        b"PROXY TCP4 " + b"1" * 200,
    ):
        with pytest.raises(proxy.ProxyError):
            proxy.parse(bad)


@given(
    st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), ports, ports, st.binary(max_size=64)
)
def test_v2_round_trip(addresses: tuple[str, str], sport: int, dport: int, rest: bytes) -> None:
    blob = proxy.encode_v2((addresses[0], sport), (addresses[1], dport))
    header = proxy.parse(blob + rest)
    assert header == proxy.ProxyHeader((addresses[0], sport), len(blob))
    for cut in range(len(blob)):  # every prefix asks for more, never misreads
        assert proxy.parse(blob[:cut]) is None


@given(st.tuples(ipv4, ipv4), ports, ports)
def test_v1_round_trip(addresses: tuple[str, str], sport: int, dport: int) -> None:
    line = proxy.encode_v1((addresses[0], sport), (addresses[1], dport))
    assert proxy.parse(line) == proxy.ProxyHeader((addresses[0], sport), len(line))


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_parse_or_fail_cleanly(data: bytes) -> None:
    try:
        header = proxy.parse(data)
    except proxy.ProxyError:
        return
    assert header is None or 0 < header.length <= len(data)


@given(st.binary(min_size=16, max_size=80))
def test_v2_with_any_body_never_crashes(body: bytes) -> None:
    data = proxy.V2_SIGNATURE + body
    try:
        header = proxy.parse(data)
    except proxy.ProxyError:
        return
    assert header is None or header.length <= len(data)


def test_v2_local_is_a_health_check() -> None:
    blob = proxy.V2_SIGNATURE + bytes([0x20, 0x00, 0, 0])
    assert proxy.parse(blob) == proxy.ProxyHeader(None, 16)


# ---- a real relayd behind a balancer ------------------------------------------------------


@pytest.fixture
def relayd(tmp_path: Path) -> Relayd:
    port = free_port()
    r = Relayd(
        tmp_path,
        extra=(
            f'[[listener]]\nname = "balanced"\naddress = "127.0.0.1:{port}"\nmode = "inbound"\n'
            'tls = "none"\nproxy_protocol = true\n\n'
            '[relay]\ndomains = ["served.example"]\n\n'
            '[server]\nproxy_from = ["127.0.0.1"]\n'
        ),
    )
    r.proxy_port = port  # type: ignore[attr-defined]
    return r


def talk(port: int, source: str, first: bytes, lines: list[bytes]) -> list[bytes]:
    """Connect from ``source``, send ``first`` at once, then each line, reading a reply each."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(first)
        replies = []
        stream = s.makefile("rb")
        replies.append(stream.readline())
        for line in lines:
            s.sendall(line)
            reply = stream.readline()
            while reply[3:4] == b"-":
                reply = stream.readline()
            replies.append(reply)
        return replies


def test_the_header_names_the_client_everywhere(relayd: Relayd) -> None:
    with relayd as r:
        r.start()
        port = r.proxy_port  # type: ignore[attr-defined]
        header = proxy.encode_v2(("203.0.113.7", 40000), ("127.0.0.1", port))
        replies = talk(
            port,
            "127.0.0.1",
            header,
            [
                b"EHLO client.test\r\n",
                b"MAIL FROM:<a@sender.test>\r\n",
                b"RCPT TO:<x@elsewhere.test>\r\n",
                b"QUIT\r\n",
            ],
        )
        assert replies[0].startswith(b"220")
        # From 127.0.0.1 itself this would be allowed ([relay] networks is loopback);
        # the client the balancer names is a stranger: relay access denied.
        assert replies[3].startswith(b"554 5.7.1"), replies
        assert "unknown[203.0.113.7]" in r.wait_log("reject: RCPT from unknown[203.0.113.7]")
        # v1 with the message pipelined right behind the header, and Received: names it.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(proxy.encode_v1(("198.51.100.9", 1234), ("127.0.0.1", port)))
            stream = s.makefile("rb")
            assert stream.readline().startswith(b"220")
        import smtplib

        client = smtplib.SMTP(timeout=10)
        client.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sock.sendall(proxy.encode_v1(("198.51.100.9", 1234), ("127.0.0.1", port)))
        client.file = None
        assert client.getreply()[0] == 220
        client.ehlo("client.test")
        qid = send(client, "a@sender.test", ["bob@served.example"], b"Subject: x\r\n\r\nbody\r\n")
        client.quit()
        from relayd.spool.store import Spool

        stored = Spool(r.spool).read_data(qid)
        assert b"[198.51.100.9]" in stored.split(b"\r\n\r\n")[0]
        assert r.stop() == 0


@pytest.mark.parametrize(
    ("source", "first", "why"),
    [
        ("127.0.0.5", b"PROXY TCP4 203.0.113.7 127.0.0.1 1 25\r\n", "not in [server] proxy_from"),
        ("127.0.0.1", b"EHLO no-header.test\r\n", "no PROXY protocol header"),
        ("127.0.0.1", b"PROXY TCP4 300.0.0.1 127.0.0.1 1 25\r\n", "PROXY v1"),
    ],
)
def test_connections_without_a_trusted_header_are_closed(
    relayd: Relayd, source: str, first: bytes, why: str
) -> None:
    with relayd as r:
        r.start()
        port = r.proxy_port  # type: ignore[attr-defined]
        with socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(source, 0)
        ) as s:
            s.sendall(first)
            with contextlib.suppress(ConnectionResetError):  # a reset is a close too
                assert s.recv(100) == b""  # closed without a greeting
        assert why in r.wait_log("PROXY protocol from")
        assert r.stop() == 0


def test_proxy_protocol_without_proxy_from_is_a_config_error(tmp_path: Path) -> None:
    from relayd.config import ConfigError, load_config

    path = tmp_path / "relayd.toml"
    path.write_text(
        'hostname = "mail.relayd.test"\n[[listener]]\nname = "b"\naddress = "127.0.0.1:2599"\n'
        'mode = "inbound"\ntls = "none"\nproxy_protocol = true\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "proxy_from" in str(caught.value)


def test_a_header_that_never_comes_is_cut_after_5_seconds(relayd: Relayd) -> None:
    with relayd as r:
        r.start()
        port = r.proxy_port  # type: ignore[attr-defined]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"PROXY TCP4 203.0.113.7")  # and then nothing
            started = time.monotonic()
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(100) == b""
            waited = time.monotonic() - started
        assert proxy.HEADER_TIMEOUT - 0.5 < waited < proxy.HEADER_TIMEOUT + 2
        assert "no header in time" in r.wait_log("PROXY protocol from")
        assert r.stop() == 0
