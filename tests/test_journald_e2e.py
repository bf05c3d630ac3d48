"""A real relayd writing to journald's native socket, with and without systemd-python.

The daemon runs in its own mount namespace (``unshare -m``) where
``/run/systemd/journal`` is a directory of the test's, holding a datagram
socket the test reads: the very path libsystemd and relayd's pure-Python
sender write to. One message is accepted and delivered to a loopback MX;
the entries must carry QUEUE_ID, RECIPIENT, DSN and STATUS as fields, not
only in the text. Where mount namespaces are not allowed the test says so
in the skip reason; it never passes without looking.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.dnsserver import DNSServer
from support.mxserver import MXServer
from support.ports import free_port
from support.relayd_proc import Relayd, send

MSG = b"From: a@sender.test\r\nMessage-ID: <j1@sender.test>\r\nSubject: journal\r\n\r\nbody\r\n"
MOUNT = 'mkdir -p /run/systemd/journal && mount --bind "$0" /run/systemd/journal && exec "$@"'


def _namespaces_allowed() -> str | None:
    """None when ``unshare -m`` with a bind mount works here, else why not."""
    try:
        run = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "true"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare not usable: {exc}"
    if run.returncode != 0:
        return f"mount namespaces not allowed here: {run.stderr.decode(errors='replace')[:200]}"
    return None


REASON = _namespaces_allowed()


def parse_entry(datagram: bytes) -> dict[str, bytes]:
    """journald's native protocol: ``KEY=value`` lines, or ``KEY``, length, bytes."""
    fields: dict[str, bytes] = {}
    pos = 0
    while pos < len(datagram):
        end = datagram.index(b"\n", pos)
        line = datagram[pos:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value
            pos = end + 1
        else:
            (size,) = struct.unpack("<Q", datagram[end + 1 : end + 9])
            fields[line.decode()] = datagram[end + 9 : end + 9 + size]
            pos = end + 9 + size + 1
    return fields


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    directory = tmp_path / "journal"
    directory.mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(directory / "socket"))
    sock.settimeout(0.2)
    try:
        yield directory, sock
    finally:
        sock.close()


def read_entries(sock: socket.socket, until: str, timeout: float = 20.0) -> list[dict[str, bytes]]:
    """Entries until one whose MESSAGE contains ``until``."""
    entries: list[dict[str, bytes]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            continue
        entries.append(parse_entry(data))
        if until.encode() in entries[-1].get("MESSAGE", b""):
            return entries
    messages = [e.get("MESSAGE", b"") for e in entries]
    raise TimeoutError(f"{until!r} not in the journal within {timeout}s: {messages}")


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
@pytest.mark.parametrize("sender", ["native", "systemd-python"])
def test_accept_and_delivery_reach_the_journal_as_fields(
    tmp_path: Path, journal: tuple[Path, socket.socket], sender: str
) -> None:
    directory, sock = journal
    env: dict[str, str] = {}
    if sender == "native":
        # Make "import systemd.journal" fail, as on a host without systemd-python.
        blocker = tmp_path / "no-systemd-python" / "systemd"
        blocker.mkdir(parents=True)
        (blocker / "__init__.py").write_text("")
        (blocker / "journal.py").write_text("raise ImportError('not installed')\n")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(blocker.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
    else:
        try:
            import systemd.journal  # noqa: F401
        except ImportError:
            pytest.fail("systemd-python is not installed: install the systemd extra")
    port = free_port("127.0.0.2")
    with DNSServer() as dns, MXServer("127.0.0.2", port) as mx:
        dns.add("example.org MX 10 mx.example.org", "mx.example.org A 127.0.0.2")
        r = Relayd(
            tmp_path / "relayd",
            dns_address=dns.address,
            hold_delivery=False,
            extra=f"[delivery]\nport = {port}\n",
            prefix=("unshare", "-m", "--propagation", "private", "sh", "-c", MOUNT, str(directory)),
            log_target="journald",
            env=env,
        )
        with r:
            r.start()
            with r.smtp("inbound") as s:
                s.ehlo("client.test")
                qid = send(s, "a@sender.test", ["bob@example.org"], MSG)
            mx.wait_for_messages(1)
            entries = read_entries(sock, "status=sent")
            assert r.stop() == 0
    ours = [e for e in entries if e.get("QUEUE_ID") == qid.encode()]
    accepted = next(e for e in ours if b"message-id=<j1@sender.test>" in e["MESSAGE"])
    assert accepted["SYSLOG_IDENTIFIER"].startswith(b"relayd")
    sent = next(e for e in ours if b"status=sent" in e["MESSAGE"])
    assert sent["RECIPIENT"] == b"bob@example.org"
    assert sent["DSN"] == b"2.0.0"
    assert sent["STATUS"] == b"sent"
    assert sent["PRIORITY"] == b"6"
    # Nothing went to stderr but the start-up lines before the journal was set up.
    assert "status=sent" not in r.log()


def test_parse_entry_reads_both_forms() -> None:
    from relayd.systemd import encode_entry

    blob = encode_entry({"MESSAGE": "two\nlines", "QUEUE_ID": "ABC"})
    assert parse_entry(blob) == {"MESSAGE": b"two\nlines", "QUEUE_ID": b"ABC"}
