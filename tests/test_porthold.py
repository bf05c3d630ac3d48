"""relayd.porthold: who holds a port, found the way relayd does at start (/proc)."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.ports import free_port

from relayd import porthold

pytestmark = pytest.mark.skipif(
    not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp"
)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1)
    return sock


def test_finds_its_own_listening_socket() -> None:
    port = free_port()
    with _listen("127.0.0.1", port):
        who = porthold.holder("127.0.0.1", port)
        assert who is not None
        assert who.pid == os.getpid()
        assert who.comm == Path(f"/proc/{os.getpid()}/comm").read_text().strip()
        text = porthold.explain(errno.EADDRINUSE, "127.0.0.1", port)
        assert text is not None
        assert text.startswith(f"127.0.0.1:{port} is in use by ")
        assert f"(pid {os.getpid()})" in text
        assert text.endswith("stop it or change [[listener]] address")


def test_a_wildcard_listener_holds_every_address() -> None:
    port = free_port()
    with _listen("0.0.0.0", port):
        who = porthold.holder("127.0.0.1", port)
        assert who is not None and who.pid == os.getpid()
    # ...and a wildcard bind collides with a specific one.
    with _listen("127.0.0.1", port):
        who = porthold.holder("0.0.0.0", port)
        assert who is not None and who.pid == os.getpid()


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    port = free_port()
    try:
        sock = _listen("::1", port)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    with sock:
        who = porthold.holder("::1", port)
        assert who is not None and who.pid == os.getpid()
        text = porthold.explain(errno.EADDRINUSE, "::1", port)
        assert text is not None and text.startswith(f"[::1]:{port} is in use by ")


def test_another_process_is_named(tmp_path: Path) -> None:
    port = free_port()
    script = (
        "import socket, sys\n"
        "s = socket.socket()\n"
        f"s.bind(('127.0.0.1', {port}))\n"
        "s.listen(1)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        who = porthold.holder("127.0.0.1", port)
        assert who is not None and who.pid == proc.pid
    finally:
        proc.kill()
        proc.wait(10)


def test_a_free_port_has_no_holder() -> None:
    port = free_port()
    assert porthold.holder("127.0.0.1", port) is None
    text = porthold.explain(errno.EADDRINUSE, "127.0.0.1", port)
    assert text is not None and "ss -ltnp" in text


def test_postfix_master_reads_as_postfix_master() -> None:
    who = porthold.Holder(123, "master", "/usr/lib/postfix/sbin/master")
    assert str(who) == "postfix/master (pid 123)"
    assert str(porthold.Holder(7, "exim4", "/usr/sbin/exim4")) == "exim4 (pid 7)"
    assert str(porthold.Holder(9, "relayd", "/opt/relayd/venv/bin/python3")) == "relayd (pid 9)"


def test_privileged_port_without_capability_says_so(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "sys/net/ipv4").mkdir(parents=True)
    (proc / "sys/net/ipv4/ip_unprivileged_port_start").write_text("1024\n")
    text = porthold.explain(errno.EACCES, "0.0.0.0", 25, proc)
    assert text is not None
    assert "port 25 is below 1024" in text
    assert "CAP_NET_BIND_SERVICE" in text
    assert "relayd.service" in text
    assert porthold.explain(errno.EACCES, "0.0.0.0", 2525, proc) is None


def test_proc_table_parsing(tmp_path: Path) -> None:
    """A recorded /proc/net/tcp{,6} (little-endian words), as a kernel writes it."""
    net = tmp_path / "net"
    net.mkdir()
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt uid ...\n"
    tail = "00000000:00000000 00:00000000 00000000  1000        0"
    (net / "tcp").write_text(
        header
        + f"   0: 0100007F:09C5 00000000:0000 0A {tail} 4242 1 0 100 0 0 10 0\n"
        + f"   1: 0100007F:09C6 0100007F:A000 01 {tail} 4343 1 0 100 0 0 10 0\n"
    )
    v6_loopback = "00000000000000000000000001000000"
    (net / "tcp6").write_text(
        header + f"   0: {v6_loopback}:0019 {'0' * 32}:0000 0A {tail} 5151 1 0 100 0 0 10 0\n"
    )
    assert porthold.listening_inodes("127.0.0.1", 2501, tmp_path) == [4242]
    assert porthold.listening_inodes("127.0.0.1", 2502, tmp_path) == []  # not LISTEN
    assert porthold.listening_inodes("::1", 25, tmp_path) == [5151]
    assert porthold.listening_inodes("::", 25, tmp_path) == [5151]
    assert porthold.listening_inodes("127.0.0.1", 25, tmp_path) == []
